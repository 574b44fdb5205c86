"""A fair comparison, end to end: ``python -m kdseg.study NAME [key=value ...] [-- job overrides ...]``.

``NAME`` is a study of ``sweeps/studies/`` (``fair_zoo``: every zoo method against a baseline tuned
with the same budget). Its keys can be changed on the command line (``trials=4 seeds=[0,1]
methods=[kd,cwd]``); everything after ``--`` is passed to every job (``dataset=voc
dataset.root=... teacher.checkpoint=...``). The stages, each a multirun of ``run.py`` in
``<out>/<stage>/`` whose runs are logged to MLflow like any other:

1. **teacher**: the teacher exists before any tuning run needs it (on the built-in data the
   cached one is trained here, as its own run; on real data ``teacher.checkpoint`` must be a file).
2. **tune**: the baseline's own knobs (``search:`` of ``conf/loss/none.yaml``: the learning
   rate), then every method at the baseline's tuned settings over its own search space
   (``search:`` of ``conf/loss/<method>.yaml``): ``trials`` Optuna trials each (TPE, seeded,
   ``sweep=tune``), trained on the train split less a seeded held-out part
   (``dataset.tune_fraction``) and scored on that part; the val split is never read. A method's
   trials train as one fused group (one teacher pass for all of them). Trials upload no
   checkpoint to MLflow, and once an option's best trial is recorded its trials' checkpoints
   are deleted (their configs, metrics and figures stay): a study's disk use does not grow
   with ``trials``.
3. **final**: the tuned baseline and every method at its tuned values, ``seeds`` seeds each, on
   the whole train split, scored on val, each run alone (its s / epoch is its own).
4. **time**: the tuned baseline trained for as many epochs as the costliest method's training
   took (its mean s / epoch over the baseline's), so that a method's gain can be read against
   equal compute as well as equal epochs.
5. **summary**: ``<out>/summary.md`` (budget, tuned values, paired gains with 95% t intervals
   against both baselines, costs) and ``<out>/gains.png``.

``<out>/study.json`` records what each finished stage found; a relaunch of the same command
skips finished stages and, in an unfinished one, the trials and runs that finished (the fused
launcher does not train a finished job again, and the seeded sampler proposes the same trials).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdseg.config import validate
from kdseg.data import build_datasets
from kdseg.errors import ConfigError, KdsegError, one_line, reported
from kdseg.report import load_runs, summarize
from kdseg.runtime import configure_backends, resolve_device
from kdseg.study.summary import write_study_summary
from kdseg.sweep import sweep_id_for
from kdseg.teacher import cache_path, cached_teacher

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
STUDY_DIR = ROOT / "sweeps" / "studies"
RUN_PY = ROOT / "run.py"
STATE = "study.json"
BASELINE = "none"
STAGES = ("teacher", "tune", "final", "time", "summary")


# ------------------------------------------------------------------------------ the study's config


def load_study(name: str, changes: Sequence[str]) -> DictConfig:
    """``sweeps/studies/<name>.yaml`` with ``key=value`` changes; unknown keys and bad values are one-line errors."""
    path = STUDY_DIR / f"{name}.yaml"
    if not path.is_file():
        found = sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))
        raise ConfigError(f"no study '{name}' in {STUDY_DIR} (expected one of: {', '.join(found)})")
    study = OmegaConf.load(path)
    for change in changes:
        key, sep, _ = change.partition("=")
        if not sep or key not in study:
            raise ConfigError(f"study argument '{change}': expected key=value with a key of {path.name} "
                              f"({', '.join(study)}); job overrides go after --")
    study = OmegaConf.merge(study, OmegaConf.from_dotlist(list(changes)))
    _check_study(study, path.name)
    return study


def _check_study(study: DictConfig, where: str) -> None:
    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"study {where}: {key}={OmegaConf.select(study, key)!r}: expected {expected}")

    need(isinstance(study.methods, ListConfig) and len(study.methods) > 0 and BASELINE not in study.methods,
         "methods", f"a non-empty list of loss options (the baseline, {BASELINE}, is always run)")
    need(isinstance(study.trials, int) and study.trials >= 1, "trials", "an integer >= 1")
    need(isinstance(study.seeds, ListConfig) and len(study.seeds) >= 1 and all(isinstance(s, int) for s in study.seeds),
         "seeds", "a non-empty list of integers")
    need(isinstance(study.tune_fraction, float) and 0 < study.tune_fraction < 1, "tune_fraction", "a fraction in (0, 1)")
    need(isinstance(study.max_students, int) and study.max_students >= 1, "max_students", "an integer >= 1")
    need(study.until in STAGES, "until", f"one of {', '.join(STAGES)}")


def compose_job(overrides: Sequence[str]) -> DictConfig:
    """A job's config as ``run.py`` would compose it (run from the current folder), validated."""
    cwd = os.getcwd()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.root_dir={cwd}", f"paths.output_dir={cwd}", *overrides])
    except HydraException as err:
        reason = str(err).split("\nConfig search path")[0]  # Hydra appends its search path: not the user's business
        raise ConfigError(f"job overrides {' '.join(overrides)}: {one_line(reason)}") from None
    validate(cfg)
    return cfg


def search_space(cfg: DictConfig, option: str) -> dict[str, str]:
    """The loss option's ``search:``; a method may only search its own (``loss.*``) keys, the baseline any other."""
    space = dict(cfg.loss.get("search") or {})
    if not space:
        raise ConfigError(f"loss={option} has no search space: add `search:` to conf/loss/{option}.yaml (key -> Hydra sweep, "
                          "e.g. loss.terms.<name>.weight: tag(log, interval(0.1, 10)))")
    outside = [key for key in space if key.startswith("loss.") == (option == BASELINE)]
    if outside:
        expected = "keys outside loss.* (the baseline's own knobs)" if option == BASELINE else "loss.* keys only (the method's own knobs)"
        raise ConfigError(f"conf/loss/{option}.yaml search: {', '.join(outside)}: expected {expected}")
    return space


# ------------------------------------------------------------------------------ state and stages


class Study:
    """One study's folder, its recorded state and the stage commands."""

    def __init__(self, name: str, study: DictConfig, job_overrides: Sequence[str]) -> None:
        self.name, self.study, self.job = name, study, list(job_overrides)
        self.out = Path(study.out).resolve()
        self.state_file = self.out / STATE
        try:
            self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        except ValueError as err:
            raise ConfigError(f"{self.state_file} is not a study's state ({err}): delete it to start the study "
                              "again, or set out= to another folder") from None
        recorded = self.state.get("config")
        mine = self.fingerprint()
        if recorded is not None and recorded != mine:
            changed = sorted(k for k in set(recorded) | set(mine) if recorded.get(k) != mine.get(k))
            raise ConfigError(f"{self.state_file} records a study with other {', '.join(changed)}: relaunch with the same "
                              f"arguments to continue it, or set out= to another folder for a new study")
        self.state["config"] = mine
        self.state.setdefault("stages", {})
        self.spaces: dict[str, dict[str, str]] = {}  # option -> search space, from check_options

    def fingerprint(self) -> dict[str, Any]:
        """What decides the study's results (not ``until``): relaunching with other values is refused."""
        plain = OmegaConf.to_container(self.study, resolve=True)
        plain.pop("until", None)
        return {"name": self.name, **plain, "job_overrides": self.job}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{STATE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.state_file)

    def done(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def record(self, stage: str, result: dict, seconds: float) -> None:
        self.state["stages"][stage] = result | {"wall_s": round(seconds, 1)}
        self.save()

    def save_quietly(self) -> None:
        """:meth:`save` where an error is already on its way (a full disk): a failed write only warns."""
        try:
            self.save()
        except OSError as err:
            print(f"warning: could not update {self.state_file} ({err.strerror or err})", flush=True)

    def common(self) -> list[str]:
        """Overrides of every job: the study's student, the user's job overrides, and once the teacher stage
        has found it, the teacher's checkpoint (the built-in data's cached teacher is pinned by its file:
        its cache key follows the student's optimisation settings, which the tuning changes)."""
        teacher = (self.done("teacher") or {}).get("pin")
        return [f"student={self.study.student}", *self.job, *([f"teacher.checkpoint={teacher}"] if teacher else [])]

    def multirun(self, stage: str, overrides: Sequence[str]) -> Path:
        """Run ``run.py -m`` with ``overrides`` in ``<out>/<stage>``; a failed multirun is one error line."""
        sweep_dir = self.out / stage
        if not RUN_PY.is_file():
            raise KdsegError(f"{RUN_PY} is missing: kdseg.study runs run.py's multiruns from a checkout of kdseg "
                             "(pip install -e .), not from an installed wheel")
        argv = [sys.executable, str(RUN_PY), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
        print(f"\nkdseg.study {self.name}: {stage}\n  {shlex.join(argv[1:])}", flush=True)
        code = subprocess.call(argv)
        if code != 0:
            raise KdsegError(f"stage {stage} failed (exit code {code}); its runs are in {sweep_dir}. "
                             "Fix the cause and relaunch the same command: finished trials and runs are not run again")
        return sweep_dir


def _value(value: Any) -> str:
    """A tuned value as an override (Hydra reads it back as the same float)."""
    return repr(value) if isinstance(value, float) else str(value)


def tuned_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={_value(value)}" for key, value in sorted(params.items())]


def best_trial(sweep_dir: Path) -> dict[str, Any]:
    """The Optuna sweeper's ``optimization_results.yaml``: best params and value."""
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        raise KdsegError(f"{path} is missing: the tuning multirun in {sweep_dir} did not finish")
    found = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {"params": dict(found["best_params"]), "value": float(found["best_value"])}


def drop_trial_checkpoints(sweep_dir: Path) -> int:
    """Delete the checkpoints (``*.pt``) of a tuning multirun's trial folders (``<sweep_dir>/<job number>/``);
    their configs, ``run.json``, metrics and figures stay. Returns the bytes freed."""
    freed = 0
    for trial in sweep_dir.iterdir():
        if trial.is_dir() and trial.name.isdigit():
            for path in trial.glob("*.pt"):
                if path.is_file():
                    freed += path.stat().st_size if path.stat().st_nlink == 1 else 0  # a hard link frees nothing alone
                    path.unlink()
    return freed


def write_tuned_option(conf_dir: Path, method: str, params: dict[str, Any], note: str) -> str:
    """``<conf_dir>/loss/tuned_<method>.yaml``: the method's loss option at its tuned values; returns its name."""
    nested = OmegaConf.from_dotlist([f"{key.removeprefix('loss.')}={_value(v)}" for key, v in sorted(params.items())])
    body = {"defaults": [method, "_self_"], **OmegaConf.to_container(nested)}
    path = conf_dir / "loss" / f"tuned_{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {note}\n" + OmegaConf.to_yaml(OmegaConf.create(body)))
    return path.stem


# ------------------------------------------------------------------------------ the protocol


def ensure_teacher(study: Study) -> dict:
    """The teacher the methods distil from: the built-in data's cached teacher (trained now if missing,
    on the whole train split), or the real data's ``teacher.checkpoint``."""
    cfg = compose_job([*study.common(), f"loss={study.study.methods[0]}"])
    given = cfg.teacher.checkpoint or cfg.teacher.get("pretrained")
    if given is not None or not cfg.dataset.generated:
        if given is None:
            raise ConfigError(f"dataset={cfg.dataset.name}: the study needs a trained teacher; train one "
                              "(python run.py task=teacher dataset=...) and pass -- teacher.checkpoint=PATH")
        return {"teacher": str(given)}
    device = resolve_device(cfg.trainer.device)
    configure_backends(cfg.trainer, device)
    path = cache_path(cfg)
    if not path.exists():
        cached_teacher(cfg, build_datasets(cfg.dataset), device)
    return {"teacher": str(path), "pin": str(path)}


def check_options(study: Study) -> None:
    """Every option's job config composed and validated and its search space kept in ``study.spaces``:
    bad input is one line before any stage trains anything."""
    study.spaces = {option: search_space(compose_job([*study.common(), f"loss={option}"]), option)
                    for option in (BASELINE, *study.study.methods)}


def tune(study: Study) -> dict:
    """Optuna over the baseline's knobs, then over each method's at the baseline's tuned settings; each
    option's best trial goes to the state's ``tuning`` as soon as it is known."""
    s, spaces = study.study, study.spaces
    results: dict[str, dict] = dict(study.state.get("tuning", {}))
    base: list[str] = []
    for option in (BASELINE, *s.methods):
        if option not in results:
            batch = min(s.trials, s.max_students)
            sweep_dir = study.multirun(f"tune/{option}", [
                "sweep=tune", *study.common(), f"loss={option}", *(base if option != BASELINE else []),
                f"dataset.tune_fraction={s.tune_fraction}", f"dataset.tune_seed={s.tune_seed}",
                f"hydra.sweeper.n_trials={s.trials}", f"hydra.sweeper.n_jobs={batch}",
                f"hydra.sweeper.sampler.seed={s.sampler_seed}", f"hydra.sweeper.study_name={study.name}-{option}",
                f"hydra.launcher.max_students={s.max_students}", "logger.log_checkpoints=none",
                *(f"{key}={space}" for key, space in spaces[option].items()),
            ])
            results[option] = best_trial(sweep_dir) | {"trials": s.trials, "space": spaces[option]}
            study.state["tuning"] = results
            study.save()
            freed = drop_trial_checkpoints(sweep_dir)  # only now: a relaunch skips a recorded option
            print(f"kdseg.study {study.name}: {option} tuned; deleted its trials' checkpoints ({freed / 2**30:.1f} GiB)", flush=True)
        if option == BASELINE:
            base = tuned_overrides(results[BASELINE]["params"])
    return {"baseline_overrides": base}


def final(study: Study) -> dict:
    """The tuned settings, ``seeds`` seeds each, on the whole train split, scored on val; each run alone."""
    s, tuned = study.study, study.done("tune")
    conf_dir = study.out / "conf"
    options = [BASELINE]
    for method in s.methods:
        found = study.state["tuning"][method]
        options.append(write_tuned_option(conf_dir, method, found["params"],
                                          f"kdseg.study {study.name}: {method} at its tuned values (best of {found['trials']} "
                                          f"trials, held-out mIoU {100 * found['value']:.2f})"))
    study.multirun("final", [
        f"hydra.searchpath=[file://{conf_dir}]", *study.common(), *tuned["baseline_overrides"],
        f"loss={','.join(options)}", f"seed={','.join(map(str, s.seeds))}",
        "hydra/launcher=fused", "hydra.launcher.max_students=1", "trainer.resume=auto",
    ])
    return {"options": options}


def time_matched(study: Study) -> dict:
    """The tuned baseline trained as long as the costliest method's training took: its epochs (or its
    ``trainer.max_iters`` where the schedule is set in iterations) scaled by the methods' mean s / epoch
    over the baseline's, rounded (never fewer than the baseline's own)."""
    s, tuned = study.study, study.done("tune")
    cfg = compose_job(study.common())
    records, _ = load_runs(cfg.logger.tracking_uri, cfg.logger.experiment_name, sweep_id_for(study.out / "final"))
    rows = summarize(records)
    base = next(r for r in rows if not r["terms"])
    costliest = max((r for r in rows if r["terms"]), key=lambda r: r["epoch_s_mean"])
    key = "trainer.max_iters" if cfg.trainer.max_iters is not None else "trainer.epochs"
    length = int(OmegaConf.select(cfg, key))
    matched = max(length, round(length * costliest["epoch_s_mean"] / base["epoch_s_mean"]))
    result = {"key": key, "length": matched, "base_length": length, "costliest": costliest["loss"],
              "costliest_epoch_s": costliest["epoch_s_mean"], "baseline_epoch_s": base["epoch_s_mean"]}
    if matched > length:
        study.multirun("time", [
            *study.common(), *tuned["baseline_overrides"], f"loss={BASELINE}", f"{key}={matched}",
            f"seed={','.join(map(str, s.seeds))}", "hydra/launcher=fused", "hydra.launcher.max_students=1", "trainer.resume=auto",
        ])
    return result


def summary(study: Study) -> dict:
    """``summary.md`` and the gains figures from the final and time-matched runs."""
    cfg = compose_job(study.common())
    md, figure = write_study_summary(study.out, study.name, study.state, cfg.logger.tracking_uri, cfg.logger.experiment_name)
    print(f"\nkdseg.study {study.name}: summary -> {md}\n")
    print(md.read_text())
    return {"summary": str(md), "figure": str(figure) if figure else None}


STAGE_FUNCTIONS = {"teacher": ensure_teacher, "tune": tune, "final": final, "time": time_matched, "summary": summary}


def run_study(name: str, changes: Sequence[str], job_overrides: Sequence[str]) -> Study:
    """Every stage not yet finished, up to ``until``, in order."""
    study = Study(name, load_study(name, changes), job_overrides)
    check_options(study)
    study.save()
    for stage in STAGES:
        if study.done(stage) is not None and stage != "summary":
            print(f"kdseg.study {name}: {stage} finished before ({study.out / STATE})", flush=True)
        else:
            start = time.perf_counter()
            try:
                result = STAGE_FUNCTIONS[stage](study)
            finally:  # a stage's wall time counts every launch's work on it, a failed one's too
                study.state.setdefault("spent_s", {})
                study.state["spent_s"][stage] = study.state["spent_s"].get(stage, 0.0) + time.perf_counter() - start
                study.save_quietly()
            study.record(stage, result, study.state["spent_s"][stage])
        if stage == study.study.until:
            break
    return study


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    changes, job = (rest[: rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    with reported():
        run_study(name, changes, job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
