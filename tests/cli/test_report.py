"""The report: summaries of hand-built records, its table, Markdown and CSV, its plots, and bad input."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from fedevents.engine.errors import ConfigError
from fedevents.cli.main import report_main
from fedevents.cli.report import (
    build_report,
    find_records,
    format_csv,
    format_markdown,
    format_table,
    load_record,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def val(**scores: float) -> dict[str, dict[str, float]]:
    return {task: {"val_acc": score, "val_loss": 1.0} for task, score in scores.items()}


def trained(rows: dict[str, dict[str, float]], task: str) -> dict[str, dict[str, float]]:
    """``rows`` with training metrics added to ``task``, as the recorder merges them into one dict."""
    return {**rows, task: {"tr_acc": 0.5, "tr_loss": 1.0, **rows.get(task, {})}}


def classification_record() -> dict[str, Any]:
    """Two clients, tasks a then b (sustain_rounds 1), validated every round on both tasks.

    c0 trains in rounds 1 (a), 2 (b), 3 (b); c1 only in round 2 (a), so it never starts b.
    Scores (val_acc), with the tasks started by then marked *:

        round   c0: a     b        c1: a     b
        0           .125  .125         .25   0
        1           .75*  .25          .25   0
        2           .5*   .625*        .875* .125
        3           .375* .875*        .5*   .8125

    final   c0 (.375 + .875) / 2 = .625      c1 (.5 + .8125) / 2 = .65625    mean .640625
    avg acc at round 3 over every task (FedSTIL's accuracy_on_round): as final                   mean .640625
    FedSTIL c0 a: .125 .75 .5 .375, peak .75 (round 1): samples .25 .375; b peaks in round 3: none
            pooled (.25 + .375) / 2 = .3125
            c1 a: .25 .25 .875 .5, peak .875: .375; b peaks in round 3: none  mean .34375
    max-fin c0 a: .75 - .375 = .375 (b is the last trained task)
            c1: a is its last trained task: none                             mean .375
    BWT     c0 a ended in round 1: .375 - .75 = -.375;  c1: no earlier task  mean -.375
    uploads 3 + 1 = 4
    """
    return {
        "config": {
            "exp_name": "cl",
            "exp_method": "fedavg",
            "exp_opts": {"comm_rounds": 3, "val_interval": 1, "online_clients": 2},
            "task_opts": {"sustain_rounds": 1},
            "clients": [{"client_name": "c0", "tasks": ["a", "b"]}, {"client_name": "c1", "tasks": ["a", "b"]}],
        },
        "run_id": "cl-1",
        "status": "finished",
        "last_round": 3,
        "data": {
            "c0": {
                "0": val(a=0.125, b=0.125),
                "1": trained(val(a=0.75, b=0.25), "a"),
                "2": trained(val(a=0.5, b=0.625), "b"),
                "3": trained(val(a=0.375, b=0.875), "b"),
            },
            "c1": {
                "0": val(a=0.25, b=0.0),
                "1": val(a=0.25, b=0.0),
                "2": trained(val(a=0.875, b=0.125), "a"),
                "3": val(a=0.5, b=0.8125),
            },
        },
    }


def reid_record() -> dict[str, Any]:
    """One client of the compact form, tasks a then b for 2 participations each, validated every 3 rounds.

    It trains in rounds 1, 2 (a) and 4, 5 (b). Rank-1 / mAP by round:

        round   a           b
        0       0 / 0       0 / 0
        3       .5 / .25    .125 / .0625      (b not started: left out of the summaries)
        6       .25 / .125  .75 / .5

    final rank-1 (.25 + .75) / 2 = .5, mAP (.125 + .5) / 2 = .3125; avg acc .5
    FedSTIL a: .5 .25: .25;  max-final a: .5 - .25 = .25
    BWT: a ended in round 2, which has no validation; the first after it is round 3: .25 - .5 = -.25
    """
    def scores(rank1: float, mean_ap: float) -> dict[str, float]:
        return {"val_rank_1": rank1, "val_rank_5": min(1.0, rank1 + 0.25), "val_map": mean_ap}

    rounds: dict[str, dict[str, Any]] = {
        "0": {"a": scores(0.0, 0.0), "b": scores(0.0, 0.0)},
        "3": {"a": scores(0.5, 0.25), "b": scores(0.125, 0.0625)},
        "6": {"a": scores(0.25, 0.125), "b": scores(0.75, 0.5)},
    }
    for rnd, task in ((1, "a"), (2, "a"), (4, "b"), (5, "b")):
        rounds.setdefault(str(rnd), {}).setdefault(task, {}).update(tr_acc=0.5, tr_loss=1.0)
    return {
        "config": {
            "exp_name": "reid",
            "exp_method": "fedavg",
            "task_opts": {"sustain_rounds": 2},
            "clients": {"count": 1, "tasks": ["a", "b"], "prefix": "cam-"},
        },
        "run_id": "reid-1",
        "status": "interrupted",
        "last_round": 6,
        "data": {"cam-0": dict(sorted(rounds.items(), key=lambda kv: int(kv[0])))},
    }


def row(report, i: int = 0):
    return report.experiments[i]


# --- summaries ---------------------------------------------------------------------------------------------


def test_a_classification_record_is_summarised_on_val_acc_per_client_then_averaged() -> None:
    exp = row(build_report([classification_record()]))
    assert (exp.label, exp.method, exp.status, exp.last_round, exp.metric) == ("cl", "fedavg", "finished", 3, "val_acc")
    assert exp.final == 0.640625
    assert exp.final_map is None
    assert exp.average_accuracy == 0.640625
    assert exp.forgetting_fedstil == 0.34375
    assert exp.forgetting_max_final == 0.375
    assert exp.backward_transfer == -0.375
    assert (exp.uploads, exp.upload_bytes) == (4, None)


def test_a_reid_record_uses_rank_1_and_reports_map_and_follows_sustain_rounds() -> None:
    exp = row(build_report([reid_record()]))
    assert exp.metric == "val_rank_1"
    assert [c.name for c in exp.clients] == ["cam-0"]
    assert (exp.final, exp.final_map, exp.average_accuracy) == (0.5, 0.3125, 0.5)
    assert (exp.forgetting_fedstil, exp.forgetting_max_final, exp.backward_transfer) == (0.25, 0.25, -0.25)
    assert exp.uploads == 4


def test_a_chosen_metric_replaces_the_primary_one() -> None:
    # mAP: a .25 -> .125 after its training; final (.125 + .5) / 2
    exp = row(build_report([reid_record()], metric="val_map"))
    assert (exp.metric, exp.final, exp.forgetting_fedstil, exp.backward_transfer) == ("val_map", 0.3125, 0.125, -0.125)


def test_a_failed_training_still_moves_the_client_along_its_task_stream() -> None:
    """Rounds 1 (a), 2 (b, failed), 3 (c): the engine counted round 2, so c, not b, trained in round 3.

    Started by round 3: a, b and c, so b is an earlier task. max-final: a max(.75, .5) - .5 = .25,
    b .25 - .25 = 0, c is the last: (.25 + 0) / 2 = .125. Without the failure b would be the last task
    started and only a would count: .25.
    """
    record = {
        "config": {"exp_name": "f", "clients": [{"client_name": "c0", "tasks": ["a", "b", "c"]}]},
        "data": {"c0": {"1": trained(val(a=0.75), "a"), "2": val(a=0.5, b=0.25, c=0.0),
                        "3": trained(val(a=0.5, b=0.25, c=0.75), "c")}},
        "failures": [{"round": 2, "client": "c0", "task": "b", "phase": "train", "error": "OSError: disk"}],
    }
    assert row(build_report([record])).forgetting_max_final == 0.125


def fedstil_record() -> dict[str, Any]:
    """Two clients, tasks t0 then t1, validated every round on both; mAP by round (training adds tr_ metrics):

        round   c0: t0    t1        c1: t0    t1
        0           .25   .125          .5    .5
        1           .625  .375          .375  .5
        2           .5    .25           .625  .25
        3           .75   .125          .25   .5

    FedSTIL's forgetting_on_round(R=3): per task the best value and the first round reaching it, then
    best - value for every later round, pooled over the client's tasks:
        c0  t0 best .75 in round 3: no later round;  t1 best .375 in round 1: .125, .25
            (.125 + .25) / 2 = .1875
        c1  t0 best .625 in round 2: .375;           t1 best .5 first in round 0: 0, .25, 0
            (.375 + 0 + .25 + 0) / 4 = .15625
        total (.1875 + .15625) / 2 = .171875
    (A first-local-peak, per-task mean would give c0 t0 (.125 - .125) / 2 = 0, t1 .1875 -> .09375.)
    FedSTIL's accuracy_on_round(R=3): c0 (.75 + .125) / 2 = .4375, c1 (.25 + .5) / 2 = .375; total .40625
    """
    maps = {"c0": ([.25, .625, .5, .75], [.125, .375, .25, .125]),
            "c1": ([.5, .375, .625, .25], [.5, .5, .25, .5])}
    data = {client: {str(r): {"t0": {"val_map": t0[r], "val_rank_1": 0.5},
                              "t1": {"val_map": t1[r], "val_rank_1": 0.5}} for r in range(4)}
            for client, (t0, t1) in maps.items()}
    for client, rnd, task in (("c0", 1, "t0"), ("c0", 2, "t1"), ("c1", 1, "t0"), ("c1", 3, "t1")):
        data[client][str(rnd)][task].update(tr_acc=0.5, tr_loss=1.0)
    return {
        "config": {"exp_name": "fs", "exp_method": "fedstil",
                   "clients": [{"client_name": c, "tasks": ["t0", "t1"]} for c in ("c0", "c1")]},
        "status": "finished", "last_round": 3, "data": data,
    }


def test_forgetting_and_average_accuracy_equal_fedstils_analysis_scripts() -> None:
    exp = row(build_report([fedstil_record()], metric="val_map"))
    assert exp.forgetting_fedstil == 0.171875
    assert exp.average_accuracy == 0.40625


def test_a_run_with_one_task_has_no_forgetting_and_no_bwt() -> None:
    record = fedstil_record()
    record["config"]["clients"] = [{"client_name": c, "tasks": ["t0"]} for c in ("c0", "c1")]
    for rounds in record["data"].values():
        for tasks in rounds.values():
            del tasks["t1"]
    exp = row(build_report([record], metric="val_map"))
    assert (exp.forgetting_fedstil, exp.forgetting_max_final, exp.backward_transfer) == (None, None, None)
    assert exp.average_accuracy == 0.5  # round 3: c0 .75, c1 .25
    assert "n/a" in format_table(build_report([record], metric="val_map")).splitlines()[2].split()


def test_what_a_record_cannot_give_is_none_and_nothing_crashes() -> None:
    record = {"config": {"exp_name": "early"}, "data": {"c0": {"1": trained({}, "a")}}, "status": "running"}
    exp = row(build_report([record]))
    assert exp.metric is None
    assert [exp.final, exp.average_accuracy, exp.forgetting_fedstil, exp.backward_transfer] == [None] * 4
    assert (exp.uploads, exp.last_round) == (1, None)


def test_upload_bytes_come_from_a_comm_section() -> None:
    record = {**classification_record(), "comm": {"upload_bytes": 123456}}
    assert row(build_report([record])).upload_bytes == 123456


def test_runs_of_one_experiment_are_told_apart_by_method_then_by_run_id() -> None:
    a, b, c = classification_record(), classification_record(), classification_record()
    b["config"]["exp_method"] = "fedprox"
    c["run_id"] = "cl-2"
    assert [e.label for e in build_report([a, b, c]).experiments] == ["cl-1", "cl-fedprox", "cl-2"]
    assert [e.label for e in build_report([a, b]).experiments] == ["cl-fedavg", "cl-fedprox"]


# --- outputs -----------------------------------------------------------------------------------------------


def test_the_terminal_table_has_fixed_width_columns_and_n_a_for_missing_values() -> None:
    table = format_table(build_report([classification_record(), reid_record()]))
    assert table.splitlines() == [
        "experiment  method  status       rounds  metric       final  global final     mAP  avg acc  forget FedSTIL"
        "  forget max-final      BWT  uploads  upload bytes",
        "----------  ------  -----------  ------  ----------  ------  ------------  ------  -------  --------------"
        "  ----------------  -------  -------  ------------",
        "cl          fedavg  finished          3  val_acc     0.6406           n/a     n/a   0.6406          0.3438"
        "            0.3750  -0.3750        4           n/a",
        "reid        fedavg  interrupted       6  val_rank_1  0.5000           n/a  0.3125   0.5000          0.2500"
        "            0.2500  -0.2500        4           n/a",
    ]


def test_markdown_holds_the_table_and_links_the_plots() -> None:
    record = {**classification_record(), "comm": {"upload_bytes": 1234567}}
    text = format_markdown(build_report([record]), plots=["out/cl-curves.png"])
    lines = text.splitlines()
    assert lines[0] == "# fedevents report"
    assert lines[2] == ("| experiment | method | status | rounds | metric | final | global final | mAP | avg acc "
                        "| forget FedSTIL | forget max-final | BWT | uploads | upload bytes |")
    assert lines[3].startswith("| :--- | :--- | :--- | ---: | :--- | ---: |")
    assert lines[4] == ("| cl | fedavg | finished | 3 | val_acc | 0.6406 | n/a | n/a | 0.6406 | 0.3438 | 0.3750 | -0.3750 "
                        "| 4 | 1,234,567 |")
    assert "![cl-curves](cl-curves.png)" in lines


def test_csv_keeps_full_precision_and_the_run_id() -> None:
    rows = list(csv.DictReader(io.StringIO(format_csv(build_report([classification_record()])))))
    assert rows == [{
        "experiment": "cl", "method": "fedavg", "status": "finished", "rounds": "3", "metric": "val_acc",
        "final": "0.640625", "global_final": "n/a", "final_map": "n/a", "average_accuracy": "0.640625", "forgetting_fedstil": "0.34375",
        "forgetting_max_final": "0.375", "bwt": "-0.375", "uploads": "4", "upload_bytes": "n/a", "run_id": "cl-1",
    }]


def test_the_global_models_scores_are_read_and_runs_that_differ_in_seed_and_name_form_one_group() -> None:
    runs = []
    for seed, last in ((0, 0.5), (1, 0.75)):
        record = classification_record()
        record["config"] = {**record["config"], "random_seed": seed, "exp_name": f"cl-seed{seed}", "group": "g1"}
        record["global"] = {"0": {"t0": {"val_acc": 0.25}, "t1": {"val_acc": 0.25}},
                            "3": {"t0": {"val_acc": last}, "t1": {"val_acc": last - 0.25}}}
        runs.append(record)
    first, second = build_report(runs).experiments
    assert first.global_scores == {0: {"t0": 0.25, "t1": 0.25}, 3: {"t0": 0.5, "t1": 0.25}}
    assert (first.global_final, second.global_final) == (0.375, 0.625)
    assert first.group == second.group


def test_report_files_are_written_whole_with_no_temporary_file_left(tmp_path: Path) -> None:
    report = build_report([classification_record()])
    written = write_report(report, tmp_path / "out")
    assert [p.name for p in written] == ["report.md", "report.csv"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.md"]
    assert (tmp_path / "out" / "report.csv").read_text() == format_csv(report)


def test_report_main_prints_the_table_and_writes_tables_and_plots(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    paths = [write_json(tmp_path / "cl.json", classification_record()), write_json(tmp_path / "reid.json", reid_record())]
    out = tmp_path / "report"
    assert report_main(argparse.Namespace(records=paths, out=str(out), metric=None)) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("experiment  method  status")
    assert printed.splitlines()[-1] == f"report: wrote report.md, report.csv and 8 plot(s) to {out}"
    stems = ["cl-curves", "cl-matrix", "cl-task-groups", "comparison", "forgetting", "reid-curves", "reid-matrix",
             "reid-task-groups"]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{s}.png" for s in stems]
    for stem in stems:
        data = (out / f"{stem}.png").read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, stem
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem  # for a paper
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.{ext}" for s in stems for ext in ("png", "pdf")] + ["report.csv", "report.md"])
    assert "![comparison](comparison.png)" in (out / "report.md").read_text()


def test_one_record_gets_no_comparison_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fedevents.cli.report_plots import plot_report

    written = plot_report(build_report([reid_record()]), tmp_path)
    assert [p.name for p in written] == ["reid-curves.png", "reid-matrix.png", "reid-task-groups.png"]


def test_runs_that_differ_only_in_their_seed_get_a_band_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fedevents.cli.report_plots import plot_report

    runs = []
    for seed in (1, 2):
        record = classification_record()
        record["config"]["random_seed"], record["run_id"] = seed, f"cl-{seed}"
        record["config"]["logs_dir"] = f"logs-{seed}"  # where files go does not split a group
        runs.append(record)
    other = reid_record()
    report = build_report([*runs, other])
    assert [e.seed for e in report.experiments] == [1, 2, None]
    assert report.experiments[0].group == report.experiments[1].group != report.experiments[2].group
    written = [p.name for p in plot_report(report, tmp_path, formats=("png", "svg"))]
    assert written[-3:] == ["comparison.png", "forgetting.png", "seeds.png"]
    assert (tmp_path / "seeds.svg").read_text().lstrip().startswith("<?xml")


# --- bad input ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ("[1, 2]", "a JSON array"),
        ('{"traceEvents": []}', "a JSON object without 'config' (keys: traceEvents)"),
        ('{"config": {}}', "a JSON object without 'data' (keys: config)"),
        ('{"config": [], "data": {}}', "config as a JSON array"),
        ('{"config": {}, "data": {"c0": {"1": {"a": 0.5}}}}', "data.c0.1.a as a JSON number"),
        ("{", "invalid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ],
)
def test_a_file_that_is_not_a_record_is_named_with_what_it_holds(tmp_path: Path, content: str, found: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_record(path)
    assert str(info.value) == f"report: {path}: expected a fedevents JSON record, found {found}"


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_record("runs/x.json")
    assert str(info.value) == "report: runs/x.json: expected a fedevents JSON record, found no such file"


def test_a_record_given_as_a_dict_is_checked_too() -> None:
    with pytest.raises(ConfigError) as info:
        build_report([classification_record(), {"data": {}}])
    assert str(info.value) == ("report: records[1]: expected a fedevents JSON record, "
                               "found a JSON object without 'config' (keys: data)")


def test_a_metric_no_record_holds_is_an_error_naming_the_recorded_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build_report([classification_record()], metric="val_rank_1")
    assert str(info.value) == ("report: metric 'val_rank_1': expected one of the recorded metrics "
                               "['tr_acc', 'tr_loss', 'val_acc', 'val_loss'], found it in no record")


def test_an_out_path_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    record = write_json(tmp_path / "cl.json", classification_record())
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError) as info:
        report_main(argparse.Namespace(records=[record], out=str(tmp_path / "taken"), metric=None))
    assert str(info.value) == f"report: --out {tmp_path / 'taken'}: expected a directory, found a file"


def test_without_matplotlib_the_tables_are_still_written_and_the_plots_named_as_skipped(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import sys

    for name in [m for m in sys.modules if m.partition(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes importing that name fail
    monkeypatch.delitem(sys.modules, "fedevents.cli.report_plots", raising=False)
    record = write_json(tmp_path / "cl.json", classification_record())
    assert report_main(argparse.Namespace(records=[record], out=str(tmp_path / "out"), metric=None)) == 0
    assert capsys.readouterr().err == (
        "report: plots skipped: matplotlib is not installed (pip install 'matplotlib>=3.8' to get them)\n"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.md"]


# --- finding records ---------------------------------------------------------------------------------------


def logs_folder(tmp_path: Path) -> Path:
    """A logs folder as runs leave it: two records, a trace and an events stream each, and a dry run's record."""
    logs = tmp_path / "logs"
    logs.mkdir()
    write_json(logs / "cl-1.json", classification_record())
    write_json(logs / "reid-1.json", reid_record())
    write_json(logs / "cl-1.trace.json", [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0}])
    (logs / "cl-1.events.jsonl").write_text('{"event": "ExperimentStarted"}\n')
    write_json(logs / "dry-1.json", {"config": {"exp_name": "dry"}, "run_id": "dry-1", "dry_run": True,
                                     "status": "finished", "data": {"c0": {"0": {"t0": {}}}}})
    return logs


def test_a_logs_folder_gives_its_records_and_leaves_out_the_dry_run_with_a_note(tmp_path: Path) -> None:
    logs = logs_folder(tmp_path)
    found, notes = find_records([logs])
    assert [path.name for path, _ in found] == ["cl-1.json", "reid-1.json"]
    assert notes == [f"report: left out {logs / 'dry-1.json'}: a dry-run record (no scores)"]


def test_a_shell_glob_over_records_and_traces_leaves_the_traces_out(tmp_path: Path) -> None:
    """Regression: `fedevents report logs/*.json` failed with "expected a fedevents JSON record, found a JSON array"."""
    logs = logs_folder(tmp_path)
    (logs / "old-trace.json").write_text('[\n{"ph":"M","name":"process_name","pid":1,"tid":0}')  # killed, older form
    found, notes = find_records(sorted(logs.glob("*.json")))
    assert [path.name for path, _ in found] == ["cl-1.json", "reid-1.json"]
    assert notes == [
        f"report: left out {logs / 'cl-1.trace.json'}: a Perfetto trace, not a record",
        f"report: left out {logs / 'dry-1.json'}: a dry-run record (no scores)",
        f"report: left out {logs / 'old-trace.json'}: a Perfetto trace, not a record",
    ]


def test_a_folder_without_records_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        find_records([tmp_path])
    assert str(info.value) == f"report: {tmp_path}: expected a folder holding fedevents JSON records, found none"
