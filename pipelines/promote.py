"""Registry commands: register an export, promote the challenger when the gates hold, roll back.

    w2svd register --export runs/x/export [--name NAME]       # prints models:/NAME/VERSION
    w2svd promote [--name NAME] [--config debug] [--dry-run]  # exit 0 promoted/dry-run, 3 rejected
    w2svd rollback [--name NAME]

Aliases, not stages: ``challenger`` is the latest registered version, ``champion`` what Serve and
batch generation load. ``promote`` evaluates challenger and champion on the same evaluation set
(reusing numbers already recorded on a version for that set's fingerprint), applies
``promotion.gates`` (:mod:`w2svd.gates`) and records the decision on the challenger as tags:
``promotion.decision`` (promoted / rejected / dry-run), ``promotion.reasons``,
``promotion.compared_to``, ``promotion.metric.*``. A first version (no champion yet) is judged by
the absolute bounds alone. Every champion move is appended to the model tag ``champion_history``
(a JSON list of versions), which is what ``rollback`` walks back.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from pipelines.errors import ArgumentParser, run_main
from pipelines.registry import CHALLENGER, CHAMPION, DEFAULT_MODEL_NAME, RegisteredVersion, register_export
from pipelines.tracking import registry_uri
from w2svd.config import Config, load_config
from w2svd.gates import Decision, decide

HISTORY_TAG = "champion_history"
EXIT_REJECTED = 3


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _alias_version(client, name: str, alias: str) -> RegisteredVersion | None:
    """The version behind ``alias``, or None when the alias is not set (other errors propagate)."""
    from mlflow.exceptions import MlflowException

    try:
        return RegisteredVersion.of(client.get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if "not found" in err.message.lower() or err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _require_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"registered model {name!r} does not exist; register an export first "
                         f"(w2svd register --export PATH --name {name})") from None


def champion_history(client, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def _set_history(client, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


@dataclass
class PromotionResult:
    name: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    decision: str  # "promoted" | "rejected" | "dry-run" | "already-champion"
    gate: Decision | None = None
    metrics: dict[str, dict] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return self.gate.reasons if self.gate else []


def evaluate_versions(client, versions: dict, cfg: Config, tracking_uri: str, reevaluate: bool = False,
                      log=print) -> dict[str, dict]:
    """label → metrics for label → ModelVersion, evaluating (together) only those whose recorded
    numbers are missing or come from another evaluation set."""
    from pipelines.evaluate import cached_metrics, evaluate_sources, model_source, record_on_version
    from w2svd.evalset import build_evalset
    from w2svd.metrics.domain import ensure_domain_encoder

    _, encoder_sha = ensure_domain_encoder(cfg.eval)
    fingerprint = build_evalset(cfg.eval).with_domain_encoder(encoder_sha).fingerprint()
    needed = [g.metric for g in cfg.promotion.gates]
    metrics, todo = {}, {}
    for label, version in versions.items():
        cached = None if reevaluate else cached_metrics(version, fingerprint, needed)
        if cached is not None:
            log(f"[promote] v{version.version} ({label}): reusing metrics recorded for evaluation set {fingerprint}")
            metrics[label] = cached
        else:
            todo[label] = version
    if todo:
        sources = {label: model_source(f"models:/{v.name}/{v.version}", tracking_uri) for label, v in todo.items()}
        reports = evaluate_sources(sources, cfg, log=log)
        for label, version in todo.items():
            record_on_version(client, version, reports[label])
            metrics[label] = reports[label]["metrics"]
    return metrics


def promote(name: str, cfg: Config, tracking_uri: str | None = None, dry_run: bool = False,
            reevaluate: bool = False, log=print) -> PromotionResult:
    tracking_uri = registry_uri(cfg, tracking_uri)
    client = _client(tracking_uri)
    _require_model(client, name)
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"model {name!r} has no alias {CHALLENGER!r}; register an export first "
                         f"(w2svd register --export PATH --name {name})")
    champion = _alias_version(client, name, CHAMPION)
    before = champion.version if champion else None
    if champion is not None and champion.version == challenger.version:
        log(f"[promote] v{challenger.version} is already {CHAMPION}; nothing to do")
        return PromotionResult(name, challenger.version, before, before, "already-champion")

    versions = {CHALLENGER: challenger} | ({CHAMPION: champion} if champion else {})
    metrics = evaluate_versions(client, versions, cfg, tracking_uri, reevaluate, log)
    gate = decide(metrics[CHALLENGER], metrics.get(CHAMPION), cfg.promotion.gates)

    if dry_run:
        outcome, after = "dry-run", before
    elif gate.promote:
        history = champion_history(client, name)
        if before is not None and (not history or history[-1] != before):
            history.append(before)  # a champion set by hand still becomes a rollback target
        history.append(challenger.version)
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
        _set_history(client, name, history)
        outcome, after = "promoted", challenger.version
    else:
        outcome, after = "rejected", before

    tags = {
        "promotion.decision": outcome,
        "promotion.would_promote": str(gate.promote).lower(),
        "promotion.reasons": "; ".join(gate.reasons)[:5000],
        "promotion.compared_to": f"v{before}" if before else "none (first version: absolute gates only)",
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "promotion.checks": json.dumps(gate.to_dict()["checks"])[:5000],
    }
    tags |= {f"promotion.metric.{k}": repr(float(v)) for k, v in metrics[CHALLENGER].items()}
    if champion is not None:
        tags |= {f"promotion.champion_metric.{k}": repr(float(v)) for k, v in metrics[CHAMPION].items()}
    for key, value in tags.items():
        client.set_model_version_tag(name, challenger.version, key, value)
    verb = {"promoted": "promoted to", "rejected": "NOT promoted to", "dry-run": "(dry run) would be "
            + ("promoted to" if gate.promote else "rejected as")}[outcome]
    log(f"[promote] {name} v{challenger.version} {verb} {CHAMPION} "
        f"(compared to {('v' + before) if before else 'nothing: first version'})")
    for reason in gate.reasons:
        log(f"[promote]   - {reason}")
    return PromotionResult(name, challenger.version, before, after, outcome, gate, metrics)


def rollback(name: str, tracking_uri: str | None = None, log=print) -> tuple[str, str]:
    """Point ``champion`` back at the version before the current one; returns (from, to)."""
    client = _client(registry_uri(explicit=tracking_uri))
    _require_model(client, name)
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        raise ValueError(f"model {name!r} has no {CHAMPION!r} alias; nothing to roll back")
    history = champion_history(client, name)
    if not history or history[-1] != champion.version:
        raise ValueError(f"model {name!r}: {CHAMPION} is v{champion.version} but {HISTORY_TAG} is {history}; "
                         "the alias was moved outside `w2svd promote`, so the previous champion is unknown")
    if len(history) < 2:
        raise ValueError(f"model {name!r}: v{champion.version} is the first {CHAMPION}; there is no previous "
                         "version to roll back to")
    current, previous = history[-1], history[-2]
    client.set_registered_model_alias(name, CHAMPION, previous)
    _set_history(client, name, history[:-1])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, current, "promotion.rolled_back", f"to v{previous} at {stamp}")
    client.set_model_version_tag(name, previous, "promotion.restored", f"from v{current} at {stamp}")
    log(f"[rollback] {name}: {CHAMPION} moved from v{current} back to v{previous}")
    return current, previous


# ---------------------------------------------------------------------------------------------
# Command line


def _common(p: ArgumentParser) -> None:
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help=f"registered model name (default {DEFAULT_MODEL_NAME})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, $MLFLOW_TRACKING_URI, "
                                          "or ./mlruns)")


def register_main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="w2svd register", description="log an export as a new version (alias challenger)")
    p.add_argument("--export", required=True, help="generator export folder (RUN_DIR/export)")
    p.add_argument("--config", default="debug", help="config naming the tracking URI and experiment")
    _common(p)

    def body() -> int:
        args = p.parse_args(argv)
        cfg = load_config(args.config)
        version = register_export(args.export, args.name, registry_uri(cfg, args.tracking_uri),
                                  experiment=cfg.tracking.experiment)
        print(f"models:/{args.name}/{version.version}")
        return 0

    return run_main("w2svd register", body)


def promote_main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="w2svd promote", description="move champion to the challenger if the gates hold")
    _common(p)
    p.add_argument("--config", default="debug", help="config with the evaluation set and promotion.gates")
    p.add_argument("--dry-run", action="store_true", help="evaluate and record the decision, move no alias")
    p.add_argument("--reevaluate", action="store_true", help="ignore metrics already recorded on the versions")
    p.add_argument("--out", help="write the decision and metrics as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")

    def body() -> int:
        args = p.parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        result = promote(args.name, cfg, args.tracking_uri, args.dry_run, args.reevaluate)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"name": result.name, "challenger": result.challenger, "decision": result.decision,
                           "champion_before": result.champion_before, "champion_after": result.champion_after,
                           "gates": result.gate.to_dict() if result.gate else None, "metrics": result.metrics},
                          f, indent=2)
        return EXIT_REJECTED if result.decision == "rejected" else 0

    return run_main("w2svd promote", body)


def rollback_main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="w2svd rollback", description="point champion back at the previous version")
    _common(p)

    def body() -> int:
        args = p.parse_args(argv)
        rollback(args.name, args.tracking_uri)
        return 0

    return run_main("w2svd rollback", body)


main = promote_main


if __name__ == "__main__":  # `python -m pipelines.promote …` is `w2svd promote …` (a RayJob's entrypoint)
    sys.exit(main())
