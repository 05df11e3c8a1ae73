"""Acceleration methods as plug-ins, one file each; they produce the per-scale plans the engine consumes.

    pipe(labels, accel=["cfg-cutoff", "fastvar:keep=0.4"])     # specs, plug-in objects, or a preset:
    pipe(labels, accel="balanced")                              # "exact" | "balanced" | "fast"
    str(pipe.describe_accel("fast"))  # "fast -> cfg-cutoff, ... (model's tuned preset)": what a setting runs
    plan, refiner, transformer = prepare(accel, pipe)  # what a pipeline (any ``AccelModel``) runs for a setting

Importing this package registers every method (``REGISTRY``). The engine never imports it.
"""

from nextscale.accel import cfg_cutoff, code, fastvar, hack, int8, scalekv, skip_scales  # noqa: F401 - registration
from nextscale.accel.base import (
    PRESETS,
    REGISTRY,
    Accel,
    AccelArg,
    PlanContext,
    Resolved,
    build_plan,
    describe,
    parse_spec,
    preset,
    resolve,
)
from nextscale.accel.cfg_cutoff import CfgCutoff
from nextscale.accel.code import CoDe
from nextscale.accel.fastvar import FastVAR
from nextscale.accel.hack import HACK
from nextscale.accel.int8 import Int8
from nextscale.accel.prepare import AccelModel, Prepared, describe_setting, plan_context, prepare
from nextscale.accel.scalekv import KVRoles, ScaleKV, calibrate_kv
from nextscale.accel.skip_scales import SkipScales

__all__ = [
    "HACK",
    "PRESETS",
    "REGISTRY",
    "Accel",
    "AccelArg",
    "AccelModel",
    "CfgCutoff",
    "CoDe",
    "FastVAR",
    "Int8",
    "KVRoles",
    "PlanContext",
    "Prepared",
    "Resolved",
    "ScaleKV",
    "SkipScales",
    "build_plan",
    "calibrate_kv",
    "describe",
    "describe_setting",
    "parse_spec",
    "plan_context",
    "prepare",
    "preset",
    "resolve",
]
