"""ProcessBench / PRMBench evaluation: metrics against hand-worked numbers with chosen scores,
then the real tiny PRM end to end, then (when present) real ProcessBench data."""

from __future__ import annotations

import json

import pytest

from actprm.model.build import build_prm
from actprm.model.data.records import DataError, Record, load_records
from actprm.model.eval.evaluate import evaluate_file, evaluate_records, format_eval_table
from actprm.model.prm import EnsemblePRM, PRMConfig
from support.paths import SHARED_DATA

DATA = SHARED_DATA
KEYS = {"f1", "acc_error", "acc_correct", "n", "n_error", "n_correct", "threshold", "truncated"}


def _rec(rid: str, label: int, n_steps: int, step_len: int = 1) -> dict:
    steps = [f"Step {i}: " + "x" * step_len for i in range(n_steps)]
    return {"id": rid, "generator": "hand", "problem": f"Problem {rid}?", "steps": steps,
            "final_answer_correct": label == -1, "label": label}


# Seven records: four with an error, three fully correct. SCORES are what the "PRM" says;
# r5 is truncated (2 of its 4 steps scored) before its gold error at step 2.
RECORDS = [
    _rec("r0", 1, 3), _rec("r1", 2, 3), _rec("r2", 0, 2), _rec("r5", 2, 4),
    _rec("r3", -1, 2), _rec("r4", -1, 3), _rec("r6", -1, 1),
]
SCORES = {
    "r0": [0.9, 0.2, 0.8],  # first < 0.5 at 1 = gold 1: hit
    "r1": [0.9, 0.4, 0.1],  # predicts 1, gold 2: miss
    "r2": [0.3, 0.9],  # predicts 0 = gold 0: hit
    "r5": [0.9, 0.8],  # truncated, no kept step < 0.5: predicts -1, gold 2: miss
    "r3": [0.8, 0.7],  # predicts -1 = gold -1: hit
    "r4": [0.6, 0.5, 0.49],  # 0.5 is not < 0.5, 0.49 is: predicts 2, gold -1: miss
    "r6": [0.95],  # predicts -1: hit
}


def _score_by_id(chunk):
    return [SCORES[r.id] for r in chunk]


@pytest.fixture
def pb_file(tmp_path):
    path = tmp_path / "pb.json"
    bad = _rec("bad", 9, 2)  # label out of range: the loader skips it with a reason
    path.write_text(json.dumps(RECORDS + [bad]))
    return path


@pytest.fixture(scope="module")
def tiny_prm():
    return build_prm("tiny", prm=PRMConfig(n_heads=4, score_batch_size=4))


def test_hand_worked_processbench_metrics(pb_file):
    records = load_records(pb_file).records
    r = evaluate_records(_score_by_id, records, threshold=0.5)
    # Erroneous: r0, r2 hit; r1, r5 miss -> acc_error = 2/4 = 0.5.
    # Correct: r3, r6 hit; r4 miss -> acc_correct = 2/3.
    # F1 = 2 * 0.5 * (2/3) / (0.5 + 2/3) = (2/3) / (7/6) = 4/7.
    assert r["acc_error"] == pytest.approx(0.5)
    assert r["acc_correct"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(4 / 7)
    assert (r["n"], r["n_error"], r["n_correct"]) == (7, 4, 3)
    assert r["truncated"] == 1  # r5: 2 scores for 4 steps
    assert r["threshold"] == 0.5
    assert "prmbench" not in r


def test_threshold_moves_predictions(pb_file):
    records = load_records(pb_file).records
    r = evaluate_records(_score_by_id, records, threshold=0.45)
    # At 0.45: r4 = [0.6, 0.5, 0.49] has no score < 0.45 -> predicts -1: hit, so acc_correct = 3/3.
    # Erroneous unchanged (r0 0.2, r2 0.3 still below; r1 still predicts 1): acc_error = 0.5.
    # F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert r["acc_correct"] == pytest.approx(1.0)
    assert r["acc_error"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(2 / 3)


def test_chunking_does_not_change_the_result(pb_file):
    records = load_records(pb_file).records
    calls = []

    def score(chunk):
        calls.append(len(chunk))
        return _score_by_id(chunk)

    assert evaluate_records(score, records, chunk_size=2) == evaluate_records(_score_by_id, records)
    assert calls == [2, 2, 2, 1]


def test_empty_group_gives_no_f1(pb_file):
    records = [r for r in load_records(pb_file).records if r.label != -1]
    r = evaluate_records(_score_by_id, records)
    assert r["acc_correct"] is None and r["f1"] is None
    assert r["acc_error"] == pytest.approx(0.5)
    assert "n/a" in format_eval_table(r)


def test_score_function_contract_is_checked(pb_file):
    records = load_records(pb_file).records
    with pytest.raises(ValueError, match="score lists"):
        evaluate_records(lambda chunk: [[0.9]], records)
    with pytest.raises(ValueError, match="scores for"):
        evaluate_records(lambda chunk: [[0.9] * 10 for _ in chunk], records)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_records(lambda chunk: [[float("nan")] for _ in chunk], records)


def test_prmbench_scores_by_class(tmp_path):
    # PRMBench layout: 1-based error_steps, steps in modified_process, one JSON object a line.
    rows = [
        {"idx": "p1", "modified_question": "Q1", "modified_process": ["a", "b", "c"],
         "error_steps": [2], "classification": "circular"},
        {"idx": "p2", "modified_question": "Q2", "modified_process": ["a", "b"],
         "error_steps": [1], "classification": "counterfactual"},
        {"idx": "p3", "modified_question": "Q3", "modified_process": ["a", "b"],
         "error_steps": [], "classification": "correct"},
    ]
    path = tmp_path / "prmbench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scores = {"circular_p1": [0.9, 0.3, 0.2], "counterfactual_p2": [0.7, 0.6], "correct_p3": [0.8, 0.4]}
    records = load_records(path).records
    r = evaluate_records(lambda chunk: [scores[x.id] for x in chunk], records, prmbench=True)
    # Steps (positive class = correct step; said correct when >= 0.5):
    #   p1: s0 ok/said ok tp, s1 wrong/said wrong tn, s2 ok/said wrong fn
    #   p2: s0 wrong/said ok fp, s1 ok/said ok tp
    #   p3 (class "correct", left out of overall): s0 tp, s1 fn
    # overall: tp 2, fp 1, tn 1, fn 1 -> F1 ok = 4/6, F1 wrong = 2/4, PRMScore = 7/12.
    # circular: tp 1, tn 1, fn 1 -> F1 ok = 2/3, F1 wrong = 2/3, PRMScore = 2/3.
    pb = r["prmbench"]
    assert set(pb) == {"circular", "counterfactual", "correct", "overall"}
    assert pb["overall"]["prmscore"] == pytest.approx(7 / 12)
    assert (pb["overall"]["tp"], pb["overall"]["fp"], pb["overall"]["tn"], pb["overall"]["fn"]) == (2, 1, 1, 1)
    assert pb["circular"]["prmscore"] == pytest.approx(2 / 3)
    # ProcessBench view of the same records: p1 hit, p2 predicts -1 (miss), p3 predicts 1 (miss).
    assert r["acc_error"] == pytest.approx(0.5) and r["acc_correct"] == 0.0 and r["f1"] == 0.0
    table = format_eval_table(r)
    assert "PRMBench" in table and "circular" in table and "0.583" in table


def test_prmbench_multi_solutions_is_scored_by_the_f1_of_correct_steps():
    # multi_solutions has no wrong steps: the official evaluation scores it by F1 of correct
    # steps alone. [0.9, 0.2, 0.8]: tp 2, fn 1 -> F1 ok 0.8 (averaging in F1 wrong = 0 gave 0.4).
    records = [Record("multi_solutions_0", "q", ["a", "b", "c"], -1,
                      {"error_steps": [], "classification": "multi_solutions", "source": "modified_process"}),
               Record("circular_0", "q", ["a", "b"], 1,
                      {"error_steps": [1], "classification": "circular", "source": "modified_process"})]
    scores = {"multi_solutions_0": [0.9, 0.2, 0.8], "circular_0": [0.9, 0.9]}
    pb = evaluate_records(lambda chunk: [scores[x.id] for x in chunk], records, prmbench=True)["prmbench"]
    assert pb["multi_solutions"]["prmscore"] == pytest.approx(0.8)
    # Other classes keep the mean of both F1s: circular tp 1, fp 1 -> F1 ok 2/3, F1 wrong 0.
    assert pb["circular"]["prmscore"] == pytest.approx(1 / 3)


def test_the_table_names_skip_reasons_with_counts(tiny_prm, tmp_path):
    rows = [{"idx": i, "modified_question": "Q", "modified_process": ["a", "b"], "error_steps": [2],
             "classification": c} for c in ("circular", "confidence") for i in range(3)]
    rows += [rows[0], rows[1], {"idx": 9, "modified_question": "Q", "modified_process": ["a"], "error_steps": [4],
                                "classification": "circular"}]
    path = tmp_path / "prm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = evaluate_file(tiny_prm, path, progress=False)
    assert r["n"] == 6 and r["skipped"] == 3  # both classes' idx 0..2 kept: (classification, idx) is the identity
    assert r["skip_reasons"] == {"duplicate id": 2, "error step N out of range for N steps (1-based: N..N)": 1}
    assert "3 records skipped by the loader: 2 duplicate id, 1 error step N out of range" in format_eval_table(r)


def test_evaluate_file_with_tiny_prm(tiny_prm, pb_file, capsys):
    r = evaluate_file(tiny_prm, pb_file, progress=True)
    assert KEYS | {"skipped"} <= set(r)
    assert r["n"] == 7 and r["skipped"] == 1 and r["truncated"] == 0
    assert r["f1"] is None or 0.0 <= r["f1"] <= 1.0
    assert 0.0 <= r["acc_error"] <= 1.0 and 0.0 <= r["acc_correct"] <= 1.0
    assert "scoring" in capsys.readouterr().err  # the progress bar goes to stderr
    assert "acc on erroneous" in format_eval_table(r)
    assert evaluate_file(tiny_prm, pb_file, progress=False, limit=3)["n"] == 3


def test_evaluate_file_counts_truncated_records(tiny_prm, tmp_path):
    # The tiny tokenizer is byte level and the chat prompt alone is ~150 tokens, so with
    # max_length 220 a record of four 40-byte steps keeps only its first step(s).
    short = EnsemblePRM(tiny_prm.backbone, PRMConfig(n_heads=4, max_length=220), heads=tiny_prm.heads)
    path = tmp_path / "long.json"
    path.write_text(json.dumps([_rec("long", 3, 4, step_len=40), _rec("ok", -1, 1)]))
    r = evaluate_file(short, path, progress=False)
    assert r["truncated"] == 1 and r["n"] == 2


def test_prmbench_file_gets_prmbench_metrics(tiny_prm, tmp_path):
    path = tmp_path / "prm.jsonl"
    path.write_text(json.dumps({"idx": "q", "modified_question": "Q", "modified_process": ["a", "b"],
                                "error_steps": [2], "classification": "domain_inconsistency"}) + "\n")
    r = evaluate_file(tiny_prm, path, progress=False)  # format auto-detected
    assert set(r["prmbench"]) == {"domain_inconsistency", "overall"}


def test_bad_files_raise_data_error(tiny_prm, tmp_path):
    with pytest.raises(DataError):
        evaluate_file(tiny_prm, tmp_path / "missing.json", progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError):
        evaluate_file(tiny_prm, bad, format="processbench", progress=False)


@pytest.mark.data
def test_processbench_gsm8k_subset(tiny_prm, tmp_path):
    src = DATA / "processbench" / "gsm8k.json"
    if not src.is_file():
        pytest.skip(f"ProcessBench data not found at {src} (../shared/data is absent)")
    data = json.loads(src.read_text())
    # The file lists every erroneous record before the correct ones, so its first 40 records
    # have no correct record and no F1. Take 20 of each, plus 10 more that `limit` cuts off.
    erroneous = [r for r in data if r["label"] != -1]
    correct = [r for r in data if r["label"] == -1]
    subset = tmp_path / "gsm8k-subset.json"
    subset.write_text(json.dumps(erroneous[:20] + correct[:20] + erroneous[20:30]))
    r = evaluate_file(tiny_prm, subset, progress=False, limit=40)
    assert (r["n"], r["n_error"], r["n_correct"]) == (40, 20, 20)
    assert r["f1"] is not None and 0.0 <= r["f1"] <= 1.0
