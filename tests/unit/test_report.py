"""The sweep summary (kdseg.report): row order and the gain over the baseline, paired by seed, and its figure (kdseg.viz)."""
from __future__ import annotations

import pytest


def _record(student: str, size: str, weights: dict[str, str], seed: int, miou: float):
    from kdseg.report import RunRecord

    params = {"student.encoder_name": student, "params/student_m": size, "seed": str(seed), "loss.term_order": "pi,pa,kd"}
    params |= {f"loss.terms.{name}.weight": w for name, w in weights.items()}
    name = "+".join(n for n, w in weights.items() if float(w) > 0) or "none"
    return RunRecord(f"{student}-{name}-{seed}", params, {}, miou, miou, 0.5)


def test_summary_rows_larger_student_first_then_none_pi_pa_pi_pa():
    """As in the paper's table: the larger student first, then none, pi, pa, pi + pa (terms in config order)."""
    from kdseg.report import student_order, summarize, to_markdown

    records = [
        _record(s, size, {"pi": pi, "pa": pa, "kd": "0"}, seed, 0.1 * seed)
        for s, size in (("small", "4.4"), ("big", "12.3"), ("alpha", "nan"), ("beta", "nan"))
        for pi, pa in (("100", "1"), ("0", "0"), ("100", "0"), ("0", "1"))
        for seed in (0, 1)
    ]
    # parameter count decides (a missing count counts as 0), then the name
    assert student_order(records) == ["big", "small", "alpha", "beta"]
    rows = summarize(records)
    assert [(r["student"], r["loss"]) for r in rows[:4]] == [("big", "none"), ("big", "pi"), ("big", "pa"), ("big", "pi+pa")]
    assert [r["student"] for r in rows[4::4]] == ["small", "alpha", "beta"]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["final_miou_mean"] == pytest.approx(0.05)
    # one check-mark column per active term, in the configured order; kd is never on: no column
    head, _, first, second = to_markdown(rows).splitlines()[:4]
    assert head.startswith("| model | pi | pa | seeds |")
    assert first.startswith("| Student big | - | - | 2 |") and second.startswith("| Student big | ✓ | - | 2 |")


def test_summary_gain_is_paired_by_seed_against_the_same_students_baseline():
    from kdseg.report import summarize, to_markdown

    base = {0: 0.20, 1: 0.30, 2: 0.25}
    kd = {0: 0.23, 1: 0.31, 2: 0.29}  # gains 3, 1, 4 points
    records = [_record("r18", "12.3", {"pi": "0", "pa": "0", "kd": "0"}, s, v) for s, v in base.items()]
    records += [_record("r18", "12.3", {"pi": "0", "pa": "0", "kd": "1"}, s, v) for s, v in kd.items()]
    records += [_record("r18", "12.3", {"pi": "100", "pa": "0", "kd": "0"}, 5, 0.5)]  # no baseline of seed 5
    records += [_record("mbv2", "4.4", {"pi": "0", "pa": "0", "kd": "1"}, 0, 0.1)]  # no baseline of this student
    rows = {(r["student"], r["loss"]): r for r in summarize(records)}
    gain = rows[("r18", "kd")]
    assert gain["gain_n"] == 3
    assert gain["gain_mean"] == pytest.approx(0.08 / 3) and gain["gain_std"] == pytest.approx(0.015275252, rel=1e-6)
    assert rows[("r18", "pi")]["gain_n"] == 0 and rows[("mbv2", "kd")]["gain_n"] == 0
    assert rows[("r18", "none")]["gain_n"] == 0
    # the 95% t interval by hand: 2.67 ± t(0.975, 2) x 1.5275 / sqrt(3) = 2.67 ± 4.3027 x 0.8819 = 2.67 ± 3.79
    assert gain["gain_ci"] == pytest.approx(4.302653 * 0.015275252 / 3**0.5, rel=1e-4)
    assert "| +2.67 ± 1.53 (3) | [-1.13, +6.46] |" in to_markdown(list(rows.values()))
    assert gain["gain_by_seed"] == pytest.approx({0: 0.03, 1: 0.01, 2: 0.04})


def test_an_interval_that_excludes_zero_is_marked_and_one_seed_has_none():
    from kdseg.report import excludes_zero, gain_interval, paired_gain

    up = paired_gain({0: 0.30, 1: 0.32, 2: 0.31}, {0: 0.20, 1: 0.21, 2: 0.22})  # +10, +11, +9 points
    assert excludes_zero(up) and gain_interval(up) == "[+7.52, +12.48] *"
    mixed = paired_gain({0: 0.30, 1: 0.20}, {0: 0.25, 1: 0.24})  # +5, -4 points
    assert not excludes_zero(mixed) and not gain_interval(mixed).endswith("*")
    one = paired_gain({0: 0.3, 1: 0.4}, {1: 0.35, 2: 0.1})  # seed 1 alone is paired
    assert one["gain_n"] == 1 and one["gain_mean"] == pytest.approx(0.05) and gain_interval(one) == "" and not excludes_zero(one)


def test_t_quantiles_match_an_independent_computation():
    """The table and the expansion beyond it against scipy's inverse t CDF (and two textbook values)."""
    from kdseg.report import t_975

    assert t_975(2) == pytest.approx(4.303, abs=1e-3) and t_975(10) == pytest.approx(2.228, abs=1e-3)
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 41), 60, 120, 1000]:
        assert t_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_975(0)


def test_gain_figure_only_for_rows_with_a_paired_baseline(tmp_path):
    from kdseg.report import summarize
    from kdseg.viz import save_gain_figure

    lone = [_record("r18", "12.3", {"pi": "100", "pa": "0", "kd": "0"}, 0, 0.5)]
    assert save_gain_figure(tmp_path / "none.png", summarize(lone)) is None and not (tmp_path / "none.png").exists()
    paired = lone + [_record("r18", "12.3", {"pi": "0", "pa": "0", "kd": "0"}, 0, 0.4)]
    path = save_gain_figure(tmp_path / "gains.png", summarize(paired))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_class_ious_of_the_built_in_set_follow_its_own_class_order():
    """The built-in set's shape-texture names in label order; a name the set lacks (VOC's cat) comes last."""
    from kdseg.report import class_ious

    metrics = {"val/miou": 0.4, "val/iou/square-solid": 0.3, "val/iou/cat": 0.1, "val/iou/background": 0.9, "val/iou/disc-dots": 0.2}
    assert list(class_ious(metrics, "synthetic").items()) == [
        ("background", 0.9), ("disc-dots", 0.2), ("square-solid", 0.3), ("cat", 0.1)]


def test_the_summary_says_how_its_fps_was_measured():
    """Runs with a speed_method tag (cached figures) say it; older runs (measured in each job) get the load caveat."""
    from kdseg.report import IN_JOB_SPEED, summarize, to_markdown

    record = _record("small", "4.4", {"pi": "0"}, 0, 0.1)
    record.tags["speed_device"], record.speed = "cpu, batch 1 at 64x64", {"student_fps": 50.0}
    assert f"cpu, batch 1 at 64x64; FPS {IN_JOB_SPEED}" in to_markdown(summarize([record]))
    record.tags["speed_method"] = "measured once"
    text = to_markdown(summarize([record]))
    assert "cpu, batch 1 at 64x64; FPS measured once" in text and IN_JOB_SPEED not in text


def test_a_terms_own_seed_is_part_of_the_runs_seed_not_of_its_setting():
    """cirkd / afdcd carry ``seed: ${seed}``: seeds 0 and 1 of one method are one row, a term's other options still split rows."""
    from kdseg.report import summarize

    records = []
    for seed in (0, 1):
        for size in ("20000", "100"):
            record = _record("r18", "12.3", {"pi": "0", "pa": "0", "kd": "1"}, seed, 0.2 + 0.1 * seed)
            record.params |= {"loss.terms.cirkd.seed": str(seed), "loss.terms.cirkd.pixel_memory_size": size}
            records.append(record)
    rows = summarize(records)
    assert len(rows) == 2 and all(r["seeds"] == [0, 1] for r in rows)
    assert {r["varying"]["loss.terms.cirkd.pixel_memory_size"] for r in rows} == {"20000", "100"}
    assert all("loss.terms.cirkd.seed" not in r["varying"] for r in rows)
