"""The fixed names every role shares: what bundles, configs, command lines and the wire may say.

Each set is defined once, here, as a ``StrEnum``: its members compare, hash and serialise as
their plain strings, so a manifest field or a config value is compared with members directly
and written as it is. The protocol's enums carry the same names: ``wire`` and ``from_wire``
translate between a member and its protobuf number, importing the generated module only when
called, so this module needs nothing beyond the standard library (a phone imports it as is).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self


class Task(StrEnum):
    """What a bundle's model is trained for."""

    SEQ_CLS = "seq-cls"  # an encoder with a classification head
    CAUSAL_LM = "causal-lm"  # a decoder: open-ended targets, or label words


class GraphRole(StrEnum):
    """The part of the model one graph file computes."""

    FULL = "full"
    PREFIX = "prefix"  # the frozen layers below the cut
    SUFFIX = "suffix"  # the layers above the cut, from the prefix's hidden states
    BASE = "base"  # a GGUF base model that θ enters as an adapter


class GraphFormat(StrEnum):
    ONNX = "onnx"
    TFLITE = "tflite"
    GGUF = "gguf"


class Precision(StrEnum):
    """Graph precisions: the first three are ONNX/TFLite's, the rest GGUF's."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


class ThetaChannel(StrEnum):
    """How θ enters a graph."""

    INPUT = "input"  # a graph input with a perturbation axis
    LORA_ADAPTER = "lora-adapter"
    CONTROL_VECTOR = "control-vector"


class _WireEnum(StrEnum):
    """A set the protocol also names: the protobuf enum of the same name has a member per value, plus
    ``<ENUM>_UNSPECIFIED`` (0), which reads as the first member, the protocol's default."""

    @classmethod
    def _proto(cls) -> Any:
        from fwdllm.proto.v1 import fwdllm_pb2

        return getattr(fwdllm_pb2, cls.__name__)

    @property
    def wire(self) -> Any:
        """This member's protobuf enum number (typed Any: the generated stubs give each enum field its own type)."""
        return type(self)._proto().Value(self.name)

    @classmethod
    def from_wire(cls, number: int) -> Self:
        """The member a protobuf enum number stands for; ValueError for a number this version does not know."""
        if number == 0:
            return next(iter(cls))
        try:
            return cls[cls._proto().Name(number)]
        except (KeyError, ValueError):
            raise ValueError(f"{cls.__name__} {number} is not one of {[m.wire for m in cls]}") from None


class DifferenceScheme(_WireEnum):
    """How a directional derivative is estimated: (f(θ+εv) - f(θ-εv)) / 2ε, or (f(θ+εv) - f(θ)) / ε."""

    CENTRAL = "central"
    FORWARD = "forward"


class Distribution(_WireEnum):
    """Perturbation distributions (PERTURBATION.md section 2); the sparse ones are spec version 2."""

    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    SPARSE_GAUSSIAN_0_1 = "sparse-gaussian-0.1"
    SPARSE_GAUSSIAN_0_01 = "sparse-gaussian-0.01"


class VarianceMode(StrEnum):
    """The coordinator's variance control: when a step asks for another wave of perturbations."""

    OFF = "off"
    FIXED = "fixed"  # always the configured number of waves
    THRESHOLD = "threshold"  # until the split-half variance is below an absolute bound
    RELATIVE = "relative"  # until it is below a fraction of step 0's


class AggregationMethod(StrEnum):
    """How the coordinator combines clients' estimates: a plain mean, or robust across clients."""

    MEAN = "mean"
    TRIMMED = "trimmed"
    MEDIAN = "median"
