"""The PyTorch model that every exported graph is traced from: frozen weights + θ[P, d] as an input.

The trainable tensors are not parameters: each Linear or LayerNorm that has one is replaced by
a wrapper that runs the frozen op with its constant weight and then applies the θ slices on
separate small ops (an Add for a bias, a batched MatMul pair for LoRA and adapters). So frozen
MatMuls keep constant weights (runtimes pre-pack them, delegates take them, int8 quantizes
them) and only the small ops see θ.

The perturbation axis: the batch is widened to ``P * B`` (row-major: all of θ row 0's batch
first) at the first stage that holds a trainable tensor; stages below it run once on ``B``.
That widening point is also where the prefix graph ends, so ``full`` already shares the
frozen prefix across the P rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fwdllm.export.archs import ArchSpec
from fwdllm.export.methods import Site
from fwdllm.proto.manifest import ThetaLayout
from fwdllm.proto.names import Task


class ThetaSource:
    """Holds the per-call views of θ; every wrapper reads its slices from here."""

    def __init__(self, layout: ThetaLayout):
        self.layout = layout
        self.views: dict[str, torch.Tensor] = {}

    def bind(self, theta: torch.Tensor) -> None:
        self.views = {s.name: theta[:, s.offset : s.offset + s.size].reshape(-1, *s.shape) for s in self.layout.tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]


def _per_row(y: torch.Tensor, rows: int) -> torch.Tensor:
    """View a ``[P*B, ..., n]`` activation as ``[P, B*..., n]``."""
    return y.reshape(rows, -1, y.shape[-1])


class PLinear(nn.Module):
    """A frozen Linear plus the θ-fed parts of its sites (bias, LoRA on the input, adapter on the output)."""

    def __init__(self, base: nn.Linear, src: ThetaSource, sites: list[Site]):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        kinds = {s.kind: s for s in sites}
        self.src = src
        self.bias_name = kinds["bias"].names()[0] if "bias" in kinds else None
        frozen_bias = None if self.bias_name or base.bias is None else base.bias.detach()
        self.frozen_bias = None if frozen_bias is None else nn.Parameter(frozen_bias, requires_grad=False)
        self.lora = kinds["lora"].names() if "lora" in kinds else None
        self.scaling = kinds["lora"].options["scaling"] if "lora" in kinds else 0.0
        self.adapter = kinds["adapter"].names() if "adapter" in kinds else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.frozen_bias)
        if self.lora:
            a, b = self.src[self.lora[0]], self.src[self.lora[1]]
            xa = torch.matmul(_per_row(x, a.shape[0]), a.transpose(1, 2))
            y = y + (torch.matmul(xa, b.transpose(1, 2)) * self.scaling).reshape(y.shape)
        if self.bias_name:
            b = self.src[self.bias_name]
            y = (_per_row(y, b.shape[0]) + b[:, None, :]).reshape(y.shape)
        if self.adapter:
            wd, bd, wu, bu = (self.src[n] for n in self.adapter)
            z = torch.relu(torch.matmul(_per_row(y, wd.shape[0]), wd.transpose(1, 2)) + bd[:, None, :])
            y = y + (torch.matmul(z, wu.transpose(1, 2)) + bu[:, None, :]).reshape(y.shape)
        return y


class PLayerNorm(nn.Module):
    """A LayerNorm whose bias comes from θ (BitFit)."""

    def __init__(self, base: nn.LayerNorm, src: ThetaSource, site: Site):
        super().__init__()
        self.shape = tuple(base.normalized_shape)
        self.eps = base.eps
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.src = src
        self.bias_name = site.names()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.shape, self.weight, None, self.eps)
        b = self.src[self.bias_name]
        return (_per_row(y, b.shape[0]) + b[:, None, :]).reshape(y.shape)


@dataclass
class Plan:
    """What the exporter decided: sites, θ layout and where the model is cut."""

    spec: ArchSpec
    sites: list[Site]
    layout: ThetaLayout
    num_layers: int
    expand_stage: int  # first stage (0 = embeddings) holding a trainable tensor; num_layers + 1 for head only
    task: str
    num_labels: int | None
    label_token_ids: tuple[int, ...] | None = None  # decoders answering with a label word

    @property
    def classifies(self) -> bool:
        """Whether the graphs score a closed label set: seq-cls, or a decoder's label words."""
        return self.task == Task.SEQ_CLS or bool(self.label_token_ids)

    @property
    def cut_layer(self) -> int | None:
        """Layers the prefix graph runs (None when embeddings are trainable: nothing to cut)."""
        return self.expand_stage - 1 if self.expand_stage >= 1 else None

    def theta0(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1).float() for site in self.sites for _, t in site.tensors])


def patch_model(model: nn.Module, plan: Plan) -> tuple[nn.Module, ThetaSource]:
    """A copy of the frozen model with θ-fed wrappers at every site."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    src = ThetaSource(plan.layout)
    by_path: dict[str, list[Site]] = {}
    for site in plan.sites:
        if site.kind != "head":
            by_path.setdefault(site.path, []).append(site)
    for path, sites in by_path.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, leaf)
        if isinstance(base, nn.LayerNorm):
            wrapped = PLayerNorm(base, src, sites[0])
        else:
            wrapped = PLinear(base, src, sites)
        setattr(parent, leaf, wrapped)
    return model, src


def _widen(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``[B, ...]`` -> ``[rows * B, ...]``, θ row-major."""
    return x.unsqueeze(0).expand(rows, *x.shape).reshape(-1, *x.shape[1:])


class PerturbableModel(nn.Module):
    """Runs the patched model stage by stage; the three graph roles are three entry points."""

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        self.model, self.src = patch_model(model, plan)
        self.plan = plan
        self.spec = plan.spec
        # label words: the LM head's rows for those tokens only (a graph never holds the vocabulary-wide matrix)
        self.label_head = plan.spec.label_head(self.model, list(plan.label_token_ids)) if plan.label_token_ids else None

    def _run(self, h, mask, theta, start, stop, token_type_ids=None):
        """Stages ``start..stop-1``; widens h and mask to P*B at the plan's expand stage when θ is given.

        With a label-word head the last layer computes only the answer position: h is then ``[N, 1, H]``.
        ``token_type_ids`` reach the embeddings of architectures that have token types (inference graphs).
        """
        spec, model = self.spec, self.model
        rows = theta.shape[0] if theta is not None else None
        ctx = None
        for s in range(start, stop):
            if rows is not None and s == self.plan.expand_stage:
                h, mask, ctx = _widen(h, rows), _widen(mask, rows), None
            if s == 0:
                h = spec.embed(model, h, token_type_ids)
                continue
            if ctx is None:
                ctx = spec.context(model, mask, h)
            if self.label_head is not None and s == self.plan.num_layers:
                h = spec.run_layer_at(model, s - 1, h, ctx, _answer_position(mask))
            else:
                h = spec.run_layer(model, s - 1, h, ctx)
        return h, mask

    def prefix(self, input_ids, attention_mask, token_type_ids=None):
        h, _ = self._run(input_ids, attention_mask, None, 0, self.plan.expand_stage, token_type_ids)
        return h

    def suffix(self, hidden, attention_mask, labels, theta):
        self.src.bind(theta)
        start = self.plan.expand_stage
        h, mask = self._run(hidden, attention_mask, theta, start, self.plan.num_layers + 1)
        return self._head(h, mask, labels, theta, widened=start <= self.plan.num_layers)

    def full(self, input_ids, attention_mask, labels, theta):
        self.src.bind(theta)
        h, mask = self._run(input_ids, attention_mask, theta, 0, self.plan.num_layers + 1)
        return self._head(h, mask, labels, theta, widened=self.plan.expand_stage <= self.plan.num_layers)

    def _head(self, h, mask, labels, theta, widened):
        rows = theta.shape[0]
        if self.label_head is not None:  # h holds the answer position only (_run)
            answer = self.spec.final(self.model, h)[:, 0]
            answer = answer.reshape(rows, -1, answer.shape[-1]) if widened else answer.unsqueeze(0).expand(rows, -1, -1)
            return _cross_entropy(self.label_head(answer), labels, rows)
        h = self.spec.final(self.model, h)
        if self.plan.task == Task.CAUSAL_LM:
            return (self._lm_loss(h, mask, labels, rows, widened),)
        pooled = mean_pool(h, mask)
        pooled = pooled.reshape(rows, -1, pooled.shape[-1]) if widened else pooled.unsqueeze(0).expand(rows, -1, -1)
        w, b = self.src["classifier.weight"], self.src["classifier.bias"]
        return _cross_entropy(torch.matmul(pooled, w.transpose(1, 2)) + b[:, None, :], labels, rows)

    def _lm_loss(self, h, mask, labels, rows, widened):
        """Mean next-token cross-entropy over labels != -100 (labels aligned with input_ids, shifted here, as HF)."""
        if not widened:
            h = _widen(h, rows)
        logits = self.spec.lm_head(self.model)(h)[:, :-1, :]
        target = labels.long()[:, 1:]
        valid = target != -100
        safe = torch.where(valid, target, torch.zeros_like(target))
        logp = torch.log_softmax(logits, dim=-1)
        nll = -torch.gather(logp, 2, _widen(safe, rows).unsqueeze(-1)).squeeze(-1)
        nll = nll * _widen(valid, rows).to(nll.dtype)
        count = valid.to(nll.dtype).sum().clamp(min=1.0)
        return nll.reshape(rows, -1).sum(1) / count


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoders' head input: the mean of the last hidden states over real tokens."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def _answer_position(mask: torch.Tensor) -> torch.Tensor:
    """Where a label word is scored: each row's last real token (prompts are right-padded)."""
    return mask.long().sum(1) - 1


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the batch per θ row, and the logits ``[P, B, C]`` it was taken from."""
    logp = torch.log_softmax(logits, dim=-1)
    idx = labels.long()[None, :, None].expand(rows, -1, 1)
    return -torch.gather(logp, 2, idx).squeeze(2).mean(1), logits


class GraphModule(nn.Module):
    """One role of a PerturbableModel as a plain ``forward`` for tracing exporters.

    Takes the role's inputs positionally (ONNX) or by name (litert-torch names the TFLite
    signature's inputs after the keywords); returns ``{output name: tensor}``.
    """

    def __init__(self, pm: PerturbableModel, role: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        super().__init__()
        self.pm, self.role, self.inputs, self.outputs = pm, role, inputs, outputs

    def forward(self, *args, **kwargs):
        if kwargs:
            args = tuple(kwargs[n] for n in self.inputs)
        result = getattr(self.pm, self.role)(*args)
        result = result if isinstance(result, tuple) else (result,)
        return dict(zip(self.outputs, result))
