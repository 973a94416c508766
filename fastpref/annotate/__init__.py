"""Preference annotation with LLMs: CDR density-ratio rewards and RLAIF labelers (docs/methods.md#cdr,
docs/methods.md#rlaif).

Scoring runs in inference mode through the fused log-prob op (no ``[B, T, V]`` logits); output is
JSONL in input order, resumable and shardable across processes (``torchrun``). Command line:
``fastpref annotate cdr ...`` and ``fastpref annotate rlaif ...``.
"""
from fastpref.annotate.cdr import CDRAnnotator, CDRConfig, DomainRouter, Exemplar, ExemplarBlock, Guidance, build_pair
from fastpref.annotate.jsonl import RecordError, ResumableWriter, merge_shards
from fastpref.annotate.rlaif import (
    PairExemplar,
    RLAIFConfig,
    RLAIFLabeler,
    debiased_preference,
    expected_score,
    rescale_score,
    soft_preference,
)
from fastpref.annotate.runner import AnnotationError, Outcome, RunReport, annotate_file
from fastpref.annotate.scoring import ScoringModel, restricted_logprobs, restricted_logprobs_ref

__all__ = [
    "AnnotationError",
    "CDRAnnotator",
    "CDRConfig",
    "DomainRouter",
    "Exemplar",
    "ExemplarBlock",
    "Guidance",
    "Outcome",
    "PairExemplar",
    "RLAIFConfig",
    "RLAIFLabeler",
    "RecordError",
    "ResumableWriter",
    "RunReport",
    "ScoringModel",
    "annotate_file",
    "build_pair",
    "debiased_preference",
    "expected_score",
    "merge_shards",
    "rescale_score",
    "restricted_logprobs",
    "restricted_logprobs_ref",
    "soft_preference",
]
