"""`factory gvm` end to end: the local OpenAI-compatible server with a deterministic GVM
teacher (some answers malformed), the real sentence encoder, and once the embedded SmolLM2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gvm_data import oracle, toy_warehouse
from typer.testing import CliRunner

from factory.errors import FactoryError
from factory.gvm.phases import catalog
from factory.teacher import Sampling, TeacherOptions
from factory.templates import add_discovered, get_template
from factory.testing.openai_server import OpenAIServer
from factory.testing.simulated import STYLES, GvmTeacher, describe, history_titles
from factory.warehouse import Warehouse
from jobs.gvm import encoder_for, run_gvm

GOOD_PATH = STYLES[0][0]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy dataset with its catalog, and every filler description the test teacher can
    write, already in the embedding cache (copied per test)."""
    wh = toy_warehouse(tmp_path_factory.mktemp("toy") / "toy.duckdb")
    _, encode = encoder_for(wh, None, "catalog")
    catalog(wh, "toy", encode)
    with wh.read() as con:
        titles = [t for (t,) in con.execute("select title from items where dataset = 'toy'")
                  .fetchall()]
    encode([describe(i, t) for i in range(20) for t in titles])
    return wh.path


@pytest.fixture()
def toy(toy_base: Path, tmp_path: Path) -> Warehouse:
    shutil.copy(toy_base, tmp_path / "factory.duckdb")
    return Warehouse(tmp_path / "factory.duckdb")


def options(server: OpenAIServer, **kw) -> TeacherOptions:
    return TeacherOptions(url=server.url, model="test-teacher", timeout=5.0, backoff=0.01,
                          concurrency=8, **kw)


def gvm(wh: Warehouse, teacher: TeacherOptions, **kw) -> str | None:
    args = dict(split="loo", users=25, samples=4, n_items=20, max_history=20,
                prune_threshold=0.85, prune_scope="user", cluster="kmeans", k_min=2, k_max=5,
                min_cluster_size=10, exemplars=5, encoder=None)
    args.update(kw)
    return run_gvm(wh, "toy", teacher=teacher, **args)


def test_gvm_finds_the_style_that_recommends_well_and_reruns_for_free(toy: Warehouse) -> None:
    teacher = GvmTeacher(oracle(toy, "toy"), malformed=0.3)
    with OpenAIServer(teacher) as server:
        run = gvm(toy, options(server))
        sent = server.count()
        prompts = [r.body["messages"][-1]["content"] for r in server.records]
        with toy.read() as con:
            assert con.execute("select status from job_runs where run_id = ?",
                               [run]).fetchone() == ("succeeded",)
            assert get_template(con, "discovered", "toy").steps == (
                "Review purchase history", "Find favourite category", "Item Recommendation")
            chains = con.execute(
                "select count(*), count(*) filter (where status = 'failed'),"
                " count(*) filter (where len(warnings) > 0), count(*) filter (where pruned)"
                " from gvm_chains where run_id = ?", [run]).fetchone()
            assert chains[0] == 25 * 4 and chains[2] > 0 and chains[3] > 0
            assert con.execute("select count(*) from gvm_chains where run_id = ? and"
                               " status = 'failed' and error is null", [run]).fetchone() == (0,)
            best = con.execute("select exemplars[1], quality, ci_low from gvm_clusters"
                               " where run_id = ? and chosen", [run]).fetchone()
            assert best[0] == GOOD_PATH and best[1] > 0.5 and best[2] > 0.3
            # every prompt shows exactly a user's training history, never a held-out item
            held = {tuple(h): (v, t) for h, v, t in con.execute(
                "select list(i.title order by s.position) filter (where s.part = 'train'),"
                " any_value(i.title) filter (where s.part = 'valid'),"
                " any_value(i.title) filter (where s.part = 'test')"
                " from split_interactions s join items i using (dataset, item_id)"
                " where s.dataset = 'toy' and s.split = 'loo' group by s.user_id").fetchall()}
        generate = [p for p in prompts if "historical behavior data" in p]
        assert len(generate) == sent - 1  # and one Fig. 10 abstraction
        for prompt in generate:
            titles = history_titles(prompt)
            valid, test = held[titles]
            assert valid not in prompt and test not in prompt

        again = gvm(toy, options(server))
        assert server.count() == sent  # everything came from the cache
    with toy.read() as con:
        assert again != run
        assert con.execute("select bool_and(cached) from gvm_chains where run_id = ?",
                           [again]).fetchone() == (True,)
        # the same answers mine the same template: its name (and so distill's chain set
        # under `--template discovered`) does not change
        assert get_template(con, "discovered", "toy").name == run
        assert con.execute("select template from gvm_patterns where run_id = ?",
                           [again]).fetchone() == (run,)
        # every chain and the abstraction are in `traces`, with verdicts matching the chains
        verdicts = dict(con.execute(
            "select verdict, count(*) from traces where job = 'gvm' and run_id = ?"
            " group by 1", [run]).fetchall())
        assert sum(verdicts.values()) == 25 * 4
        assert verdicts["rejected"] == chains[3] and verdicts.get("failed", 0) == chains[1]
        assert con.execute("select count(*) from traces where job = 'gvm-abstract'"
                           " and run_id = ? and verdict = 'kept'", [run]).fetchone() == (1,)
        assert con.execute("select count(*) from traces where job = 'gvm' and reason is null"
                           " and verdict <> 'kept'").fetchone() == (0,)


def test_weak_data_completes_and_says_so(toy: Warehouse) -> None:
    with OpenAIServer(GvmTeacher({})) as server:  # no oracle: nothing ever hits
        run = gvm(toy, options(server), users=12, samples=2, min_cluster_size=3)
        assert not any("CoT cluster" in r.body["messages"][-1]["content"]
                       for r in server.records)
    with toy.read() as con:
        status, = con.execute("select status from job_runs where run_id = ?", [run]).fetchone()
        verdict, template, error = con.execute(
            "select verdict, template, error from gvm_patterns where run_id = ?",
            [run]).fetchone()
    assert status == "succeeded" and template is None
    assert "Recall@20 = 0" in verdict and error == verdict


def test_no_parsed_answer_embeds_nothing(toy: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answer unparseable (the canned test server): nothing to validate, so the
    catalog is not embedded; the embedder is not even called."""
    import json

    asked, encoded = _count_embedder(monkeypatch)
    with OpenAIServer() as server:
        run = gvm(toy, options(server), users=4, samples=1)
    assert asked == [] and encoded == []
    with toy.read() as con:
        counts = json.loads(con.execute("select counts from job_runs where run_id = ?",
                                        [run]).fetchone()[0])["gvm"]
    assert counts["kept"] == 0 and counts["chains"] == 0
    assert counts["embeddings"]["seen"] == 0 and "catalog" not in counts["seconds"]


def _count_embedder(monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[str]], list[str]]:
    """(texts of every Embedder.embed call, texts the model encoded), recorded as they go."""
    from factory.embeddings import Embedder

    asked: list[list[str]] = []
    encoded: list[str] = []
    embed, encode = Embedder.embed, Embedder._encode

    def counting_embed(self, texts, label="embedding"):
        asked.append(list(texts))
        return embed(self, texts, label)

    def counting_encode(self, texts):
        encoded.extend(texts)
        return encode(self, texts)

    monkeypatch.setattr(Embedder, "embed", counting_embed)
    monkeypatch.setattr(Embedder, "_encode", counting_encode)
    return asked, encoded


def test_compare_with_no_parsed_answer_never_calls_the_embedder(
        toy: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: `gvm compare` embedded the whole catalogue up front, even when every answer
    failed; validation now asks for it only when a description is to be mapped."""
    asked, encoded = _count_embedder(monkeypatch)
    with OpenAIServer() as server:       # canned answers: none parses
        out = cli(toy, "gvm", "compare", "--dataset", "toy", "--users", "4", "--templates",
                  "two-step,three-step", "--teacher-url", server.url,
                  "--teacher-model", "test-teacher")
    assert out.exit_code == 0, out.output
    assert asked == [] and encoded == []


def test_a_second_job_reads_the_catalogue_from_the_shared_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue's item texts are encoded once, by the first job that validates; a later
    gvm run (other users) and a gvm compare run read every catalogue vector from the
    warehouse's embedding_cache (same encoder, same text hash) and encode none again."""
    from factory.gvm.sequences import item_info, item_text

    wh = toy_warehouse(tmp_path / "factory.duckdb")
    with wh.read() as con:
        catalogue = {item_text(i) for i in item_info(con, "toy").values()}
    asked, encoded = _count_embedder(monkeypatch)
    with OpenAIServer(GvmTeacher(oracle(wh, "toy"))) as server:
        gvm(wh, options(server), users=6, samples=2, min_cluster_size=2)
        first = catalogue & set(encoded)
        assert first == catalogue and len(encoded) == len(set(encoded))
        encoded.clear()
        gvm(wh, options(server), users=6, samples=2, min_cluster_size=2, sample_seed=1)
        out = cli(wh, "gvm", "compare", "--dataset", "toy", "--users", "4", "--templates",
                  "two-step", "--teacher-url", server.url, "--teacher-model", "test-teacher")
        assert out.exit_code == 0, out.output
    assert asked and not catalogue & set(encoded)


def test_bad_input_is_refused_before_any_request(toy: Warehouse, capsys) -> None:
    with OpenAIServer(GvmTeacher({})) as server:
        with pytest.raises(FactoryError, match="unknown dataset 'nope'"):
            run_gvm(toy, "nope", teacher=options(server), split="loo", users=5, samples=1,
                    n_items=20, max_history=20, prune_threshold=0.85, prune_scope="user",
                    cluster="kmeans", k_min=2, k_max=5, min_cluster_size=5, exemplars=5,
                    encoder=None)
        with pytest.raises(FactoryError, match="unknown split"):
            gvm(toy, options(server), split="temporal")
        with pytest.raises(FactoryError, match="does not shard"):
            gvm(toy, options(server, shard=(0, 2)))
        with pytest.raises(FactoryError, match="--prune-scope"):
            gvm(toy, options(server), prune_scope="everyone")
        assert gvm(toy, options(server, dry_run=True)) is None
        assert server.count() == 0
    assert "requests to send" in capsys.readouterr().err
    with toy.read() as con:
        assert con.execute("select count(*) from gvm_chains").fetchone() == (0,)


@pytest.fixture(scope="module")
def mined(toy_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A toy warehouse after one gvm run on 25 of its 40 users, and the server it used."""
    path = tmp_path_factory.mktemp("mined") / "factory.duckdb"
    shutil.copy(toy_base, path)
    wh = Warehouse(path)
    teacher = GvmTeacher(oracle(wh, "toy"), malformed=0.1, template_quality={
        "Review purchase history": 0.9, "User Interest Mining": 0.0,
        "Behavioral Data Analysis": 0.2})
    with OpenAIServer(teacher) as server:
        run = gvm(wh, options(server))
        yield wh, run, server


def cli(wh: Warehouse, *args: str):
    from factory.cli import app

    return CliRunner().invoke(app, ["--warehouse", str(wh.path), *args])


def test_show_plot_and_templates(mined, tmp_path: Path) -> None:
    wh, run, _ = mined
    out = cli(wh, "gvm", "show", "--dataset", "toy")
    assert out.exit_code == 0, out.output
    assert run in out.output and "P*" in out.output and GOOD_PATH in out.output
    assert "Review purchase history -> Find favourite category -> Item Recommendation" in \
        out.output
    png = tmp_path / "map.png"
    out = cli(wh, "gvm", "plot", "--dataset", "toy", "--out", str(png), "--run", run)
    assert out.exit_code == 0, out.output
    assert png.stat().st_size > 1000
    out = cli(wh, "gvm", "templates")
    assert out.exit_code == 0 and "five-step" in out.output and run in out.output
    out = cli(wh, "gvm", "show", "--dataset", "toy", "--run", "gvm-nope")
    assert isinstance(out.exception, FactoryError)


def test_compare_scores_templates_on_held_out_users(mined) -> None:
    wh, run, server = mined
    out = cli(wh, "gvm", "compare", "--dataset", "toy", "--users", "10",
              "--templates", "two-step,five-step,discovered",
              "--teacher-url", server.url, "--teacher-model", "test-teacher")
    assert out.exit_code == 0, out.output
    assert "discovered (" in out.output and "Recall@20" in out.output
    with wh.read() as con:
        compare_run, = con.execute("select run_id from job_runs where job = 'gvm-compare'"
                                   " order by started_at desc limit 1").fetchone()
        recall = dict(con.execute("select template, recall from gvm_evals where run_id = ?",
                                  [compare_run]).fetchall())
        overlap = con.execute(
            "select count(*) from gvm_sequences a join gvm_sequences b using (user_id)"
            " where a.run_id = ? and b.run_id = ?", [compare_run, run]).fetchone()[0]
    assert set(recall) == {"two-step", "five-step", run}
    assert recall[run] > recall["five-step"] >= recall["two-step"] == 0.0
    assert overlap == 0
    out = cli(wh, "gvm", "compare", "--dataset", "toy", "--templates", "two-step,four-step",
              "--teacher-url", server.url)
    assert isinstance(out.exception, FactoryError) and "four-step" in str(out.exception)


def test_transfer_compares_a_foreign_pattern_with_the_native_one(mined) -> None:
    wh, run, server = mined
    with wh.write() as con:
        add_discovered(con, "gvm-elsewhere", "sports", ["User Interest Mining", "Recommend"],
                       "mined on another dataset")
    out = cli(wh, "gvm", "transfer", "--from", "sports", "--to", "toy", "--users", "8",
              "--teacher-url", server.url, "--teacher-model", "test-teacher")
    assert out.exit_code == 0, out.output
    assert "vs native" in out.output and "sports" in out.output
    with wh.read() as con:
        rows = dict(con.execute(
            "select template_dataset, recall from gvm_evals where run_id = (select run_id"
            " from job_runs where job = 'gvm-transfer' order by started_at desc limit 1)"
        ).fetchall())
    assert rows["toy"] > rows["sports"]
    for args, message in [(["--from", "toy", "--to", "toy"], "same dataset"),
                          (["--from", "beauty", "--to", "toy"], "no discovered template")]:
        out = cli(wh, "gvm", "transfer", *args, "--teacher-url", server.url)
        assert isinstance(out.exception, FactoryError) and message in str(out.exception)


def test_cli_errors_are_one_line(toy: Warehouse) -> None:
    proc = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(toy.path),
                           "gvm", "--dataset", "nope"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: unknown dataset 'nope' (known: toy)"]


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(toy: Warehouse) -> None:
    """The in-process default teacher: poor paths, but the pipeline completes and says so."""
    run = gvm(toy, TeacherOptions(parse_retries=0, sampling=Sampling(max_tokens=48)),
              users=1, samples=1, min_cluster_size=1)
    with toy.read() as con:
        assert con.execute("select status, backend from job_runs where run_id = ?",
                           [run]).fetchone() == ("succeeded", "transformers")
        chains = con.execute("select status, error, call_key from gvm_chains where"
                             " run_id = ?", [run]).fetchall()
        verdict, = con.execute("select verdict from gvm_patterns where run_id = ?",
                               [run]).fetchone()
    assert len(chains) == 1 and chains[0][2]
    assert all(status == "ok" or error for status, error, _ in chains)
    assert verdict


def test_prune_scope_defaults_to_all_paths(toy: Warehouse, monkeypatch) -> None:
    """SCoTER Alg. 1 line 10 prunes C_all: `factory gvm` compares every path with every kept
    one unless told `--prune-scope user`."""
    import jobs.gvm

    seen: list[dict] = []
    monkeypatch.setattr(jobs.gvm, "run_gvm", lambda wh, dataset, **kw: seen.append(kw))
    assert cli(toy, "gvm", "--dataset", "toy").exit_code == 0
    assert cli(toy, "gvm", "--dataset", "toy", "--prune-scope", "user").exit_code == 0
    assert [kw["prune_scope"] for kw in seen] == ["global", "user"]


def test_a_teacher_seed_alone_says_how_the_users_are_drawn(ml100k) -> None:
    """`gvm --seed 3` used to draw the users too; now it is only the teacher's seed, so an old
    script is told, instead of silently getting other users."""
    from typer.testing import CliRunner

    from factory.cli import app

    out = CliRunner().invoke(app, ["--warehouse", str(ml100k.path), "gvm", "--dataset",
                                   "ml-100k", "--users", "2", "--seed", "3", "--dry-run"]).output
    assert "note: --seed 3 is the teacher's sampling seed; the users are drawn with " \
           "--sample-seed 0" in out, out


def test_n_per_request_asks_each_user_once_and_mines_the_same(toy: Warehouse,
                                                              tmp_path: Path) -> None:
    """`factory gvm --answers-per-user 4 --n-per-request 4`: one Generate request per user
    (n=4; the redraws of malformed answers go alone), and the chains, their llm_calls keys
    and the mined template are those of asking each sample alone."""
    alone = Warehouse(tmp_path / "alone.duckdb")
    shutil.copy(toy.path, alone.path)
    teacher = GvmTeacher(oracle(toy, "toy"), malformed=0.3)
    chains = ("select user_id, sample, call_key, status, draws, cot_path from gvm_chains"
              " order by all")
    with OpenAIServer(teacher) as server:
        gvm(alone, options(server), users=12)
        singles = len(server.records)
        server.reset()
        result = cli(toy, "gvm", "--dataset", "toy", "--users", "12", "--answers-per-user",
                     "4", "--history", "20", "--prune-scope", "user", "--k-max", "5",
                     "--min-cluster-size", "10", "--exemplars", "5", "--n-per-request", "4",
                     "--teacher-url", server.url, "--teacher-model", "test-teacher")
        assert result.exit_code == 0, result.output
        asked = [r.body.get("n") for r in server.records]
    assert asked.count(4) == 12 and set(asked) == {4, None}
    assert len(asked) == singles - 12 * 3
    with alone.read() as a, toy.read() as b:
        assert a.execute(chains).fetchall() == b.execute(chains).fetchall()
        assert b.execute("select count(distinct group_key) from llm_calls").fetchone() == (12,)
        assert a.execute("select steps from templates").fetchall() == \
            b.execute("select steps from templates").fetchall()
