"""Promotion by aliases: candidate -> champion, with a recorded reason.

`promote` moves `registry.champion_alias` to the candidate version when its
val mIoU and val PCKh both exceed the champion's by more than the configured
margins (or there is no champion), and records the decision either way: as
tags on the candidate version and as one JSON line of
`<run.work_dir>/registry/promotions.jsonl`. The metrics it compares are the
version tags `pipeline.registry.register_model` wrote. See docs/registry.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

from nppnet_tf.config import RunConfig
from pipeline.registry import (
    SELECTION_METRICS,
    TAG_MIOU,
    TAG_PCKH,
    registered_aliases,
)

log = logging.getLogger(__name__)

# Model version tags of the latest decision about a version.
TAG_DECISION = "promotion_decision"
TAG_REASON = "promotion_reason"
TAG_DECIDED_AT = "decided_at"

OUTCOMES = ("promoted", "refused", "unchanged")


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    """One decision of `promote`, as recorded in tags and the decision log.

    Attributes:
        name: registered model name.
        outcome: `promoted` (the champion alias moved to the candidate),
            `refused` (it stayed) or `unchanged` (the candidate already was
            the champion).
        promoted: the champion alias moved.
        reason: why, with the compared values and margins.
        candidate_version: the version considered.
        champion_version_before: the champion before the decision, or None.
        champion_version_after: the champion after the decision, or None.
        candidate_metrics: the candidate's `val_miou` and `val_pckh` tags
            (None where missing).
        champion_metrics: the champion's, or None without a champion.
        miou_margin: the margin used, in points.
        pckh_margin: the margin used, in points.
        decided_at: UTC time of the decision, ISO 8601.
        tracking_uri: the MLflow tracking URI of the registry.
    """

    name: str
    outcome: str
    promoted: bool
    reason: str
    candidate_version: str
    champion_version_before: str | None
    champion_version_after: str | None
    candidate_metrics: dict[str, float | None]
    champion_metrics: dict[str, float | None] | None
    miou_margin: float
    pckh_margin: float
    decided_at: str
    tracking_uri: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def promote(
    client, config: RunConfig, version: str | int | None = None
) -> PromotionDecision:
    """Moves the champion alias to the candidate if it beats the champion.

    The candidate (the version with `registry.candidate_alias`, or
    `version`) is promoted iff there is no champion, or both
    `candidate val_miou - champion val_miou > registry.miou_margin` and
    `candidate val_pckh - champion val_pckh > registry.pckh_margin` (strictly:
    a tie never replaces the champion). A candidate that already is the
    champion is left `unchanged`. A version without the metric tags is
    refused. The decision is recorded either way: tags `promotion_decision`,
    `promotion_reason`, `decided_at` on the candidate version and one JSON
    line in `<run.work_dir>/registry/promotions.jsonl`.

    Args:
        client: an `MlflowClient` on the registry (see `registry_client`).
        config: the run config (its `registry` and `run` sections).
        version: the version to consider; None: the candidate alias's.

    Returns:
        The `PromotionDecision`.

    Raises:
        ValueError: no such registered model or version, or no candidate.
    """
    registry = config.registry
    name = registry.model_name
    aliases = registered_aliases(client, name)
    if version is None:
        if registry.candidate_alias not in aliases:
            raise ValueError(
                f"{name} has no version with alias "
                f"{registry.candidate_alias!r} (registry.candidate_alias); "
                "register one or pass --version"
            )
        version = aliases[registry.candidate_alias]
    candidate = _model_version(client, name, str(version))
    champion_version = aliases.get(registry.champion_alias)
    champion = (
        _model_version(client, name, champion_version)
        if champion_version is not None
        else None
    )
    candidate_metrics = _tag_metrics(candidate)
    champion_metrics = _tag_metrics(champion) if champion else None
    outcome, reason = _decide(
        registry, candidate, candidate_metrics, champion, champion_metrics
    )
    if outcome == "promoted":
        client.set_registered_model_alias(
            name, registry.champion_alias, candidate.version
        )
    decision = PromotionDecision(
        name=name,
        outcome=outcome,
        promoted=outcome == "promoted",
        reason=reason,
        candidate_version=str(candidate.version),
        champion_version_before=champion_version,
        champion_version_after=(
            str(candidate.version)
            if outcome == "promoted"
            else champion_version
        ),
        candidate_metrics=candidate_metrics,
        champion_metrics=champion_metrics,
        miou_margin=registry.miou_margin,
        pckh_margin=registry.pckh_margin,
        decided_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tracking_uri=client.tracking_uri,
    )
    _record(client, config, decision)
    log.info("promotion of %s version %s: %s", name, version, reason)
    return decision


def _decide(
    registry, candidate, candidate_metrics, champion, champion_metrics
) -> tuple[str, str]:
    """(outcome, reason) of the promotion rule in `promote`."""
    champion_alias = registry.champion_alias
    who = f"version {candidate.version}"
    missing = [k for k, v in candidate_metrics.items() if v is None]
    if champion is None:
        if missing:
            return "refused", (
                f"{who} has no valid {' or '.join(missing)} tag; nothing to "
                f"promote on (there is no {champion_alias})"
            )
        return "promoted", (
            f"{who} becomes {champion_alias}: there was no {champion_alias} "
            f"(val mIoU {candidate_metrics[TAG_MIOU]:.2f}, val PCKh "
            f"{candidate_metrics[TAG_PCKH]:.2f})"
        )
    if str(champion.version) == str(candidate.version):
        return "unchanged", f"{who} already is {champion_alias}"
    if missing:
        return "refused", (
            f"{who} has no valid {' or '.join(missing)} tag; cannot compare "
            f"it with {champion_alias} version {champion.version}"
        )
    champion_missing = [k for k, v in champion_metrics.items() if v is None]
    if champion_missing:
        return "refused", (
            f"{champion_alias} version {champion.version} has no valid "
            f"{' or '.join(champion_missing)} tag; cannot compare (move the "
            f"alias by hand if {who} should serve)"
        )
    checks = []
    for key, label, margin in (
        (TAG_MIOU, "val mIoU", registry.miou_margin),
        (TAG_PCKH, "val PCKh", registry.pckh_margin),
    ):
        delta = candidate_metrics[key] - champion_metrics[key]
        text = (
            f"{label} {candidate_metrics[key]:.2f} vs "
            f"{champion_metrics[key]:.2f} ({delta:+.2f}, needs > "
            f"{margin:+.2f})"
        )
        checks.append((label, delta > margin, text))
    details = "; ".join(text for _, _, text in checks)
    failed = [label for label, passed, _ in checks if not passed]
    if not failed:
        return "promoted", (
            f"{who} beats {champion_alias} version {champion.version}: "
            f"{details}"
        )
    return "refused", (
        f"{who} does not beat {champion_alias} version {champion.version} "
        f"on {' and '.join(failed)}: {details}"
    )


def _model_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        RESOURCE_DOES_NOT_EXIST,
        ErrorCode,
    )

    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ValueError(
            f"--version {version}: {name} has no such version"
        ) from None


def _tag_metrics(version) -> dict[str, float | None]:
    metrics: dict[str, float | None] = {}
    for key in SELECTION_METRICS:
        try:
            value = float(version.tags[key])
        except (KeyError, ValueError):
            value = None
        metrics[key] = (
            value if value is not None and math.isfinite(value) else None
        )
    return metrics


def decision_log_path(config: RunConfig) -> Path:
    """`<run.work_dir>/registry/promotions.jsonl`, one decision a line."""
    return Path(config.run.work_dir) / "registry" / "promotions.jsonl"


def _record(client, config: RunConfig, decision: PromotionDecision) -> None:
    for key, value in (
        (TAG_DECISION, decision.outcome),
        (TAG_REASON, decision.reason),
        (TAG_DECIDED_AT, decision.decided_at),
    ):
        client.set_model_version_tag(
            decision.name, decision.candidate_version, key, value
        )
    path = decision_log_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(decision.to_dict(), sort_keys=True) + "\n")
