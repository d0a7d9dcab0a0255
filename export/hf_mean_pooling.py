"""Sequence classifiers that mean-pool an encoder's last hidden states over ``attention_mask`` and apply one Linear.

`fwdllm export-peft` copies this file, unchanged, into every encoder classifier it writes (as
``modeling_fwdllm.py``, named in ``config.json``'s ``auto_map``): it is the head fwdllm trains, the
sentence-transformers pooling of all-MiniLM-L6-v2, which no transformers ``*ForSequenceClassification``
computes (BERT's pools the CLS token through a tanh layer). It imports only torch and transformers, so
``AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)`` and
``pipeline("text-classification", model=DIR, trust_remote_code=True)`` load it anywhere. Each config class has
its own ``model_type``: without ``trust_remote_code`` transformers refuses the folder instead of silently
building its CLS-pooling class.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    AlbertPreTrainedModel,
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    DistilBertConfig,
    DistilBertModel,
    DistilBertPreTrainedModel,
    PreTrainedModel,
    RobertaConfig,
    RobertaModel,
    RobertaPreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class _MeanPooling(PreTrainedModel):
    """logits = Linear(mean of the last hidden states over tokens with attention_mask = 1)."""

    encoder_class: type
    encoder_options: dict = {}

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, self.encoder_class(config, **self.encoder_options))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder = getattr(self, self.base_model_prefix)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        logits = self.classifier((hidden * m).sum(1) / m.sum(1).clamp(min=1.0))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BertMeanPoolingConfig(BertConfig):
    model_type = "fwdllm-mean-pooling-bert"


class BertMeanPoolingForSequenceClassification(_MeanPooling, BertPreTrainedModel):
    config_class = BertMeanPoolingConfig
    encoder_class = BertModel
    encoder_options = {"add_pooling_layer": False}


class DistilBertMeanPoolingConfig(DistilBertConfig):
    model_type = "fwdllm-mean-pooling-distilbert"


class DistilBertMeanPoolingForSequenceClassification(_MeanPooling, DistilBertPreTrainedModel):
    config_class = DistilBertMeanPoolingConfig
    encoder_class = DistilBertModel


class AlbertMeanPoolingConfig(AlbertConfig):
    model_type = "fwdllm-mean-pooling-albert"


class AlbertMeanPoolingForSequenceClassification(_MeanPooling, AlbertPreTrainedModel):
    config_class = AlbertMeanPoolingConfig
    encoder_class = AlbertModel
    encoder_options = {"add_pooling_layer": False}


class RobertaMeanPoolingConfig(RobertaConfig):
    model_type = "fwdllm-mean-pooling-roberta"


class RobertaMeanPoolingForSequenceClassification(_MeanPooling, RobertaPreTrainedModel):
    config_class = RobertaMeanPoolingConfig
    encoder_class = RobertaModel
    encoder_options = {"add_pooling_layer": False}
