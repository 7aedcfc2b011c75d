"""`mobilellm-export release`: many recipes -> one bundle each -> one release report.

    mobilellm-export release recipes/ --checkpoint MobileLLM-125M=~/models/125M ... --output dist --jobs 2
    mobilellm-export release recipes/ --matrix                  the job list, for a CI job matrix
    mobilellm-export release --merge bundles/ --expect recipes/ --output bundles/   the final CI job

Locally, every recipe is one job in its own process (`--jobs N` at once), each the same code path as
`mobilellm-export --recipe R --checkpoint P --output DIR`. In CI, each matrix job exports one recipe and the
final job merges the bundles, re-checking each as `validate` does. Both write `release.json` (schema
`exporter/schemas/release.schema.json`) and `release.md` from the bundles on disk (manifest + parity.json),
with no timestamps or absolute paths, so the same bundles give the same bytes wherever they were exported.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import torch

from mobilellm.validation.parity import resolve_thresholds
from mobilellm.validation.reports import SCHEMA_PATH as PARITY_SCHEMA_PATH

from .bundle import MANIFEST, Bundle, artifact_bytes, open_bundle, sha256_file, write_json
from .errors import ParityError, UserError
from .hub import is_hub_id, resolve_hub_id
from .memory import human
from .pipeline import bundle_name, failed_path, run_export
from .quantize import QuantMethod
from .recipe import export_options_from_recipe, load_recipe
from .threads import one_openmp_thread_outside_torch
from .validate import validate_bundle

RELEASE_SCHEMA = "mobilellm-export/release"
RELEASE_SCHEMA_VERSION = 1
RELEASE_SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "release.schema.json"
RELEASE_JSON = "release.json"
RELEASE_MD = "release.md"
_BUNDLE_NAME = re.compile(r"[A-Za-z0-9._-]+")  # as pipeline.bundle_name writes it
# Relative export cost per parameter (README: 125M took ~600 s on ExecuTorch, ~140 s on Core ML, ~10 s on
# ONNX); only used to start the longest jobs first.
_TARGET_COST = {"executorch": 60, "coreml": 15, "onnx": 1}


@dataclass(frozen=True)
class Job:
    """One recipe of a release: one bundle, one CI matrix job."""

    recipe: Path
    model: str  #: the recipe's [model] name; `--checkpoint MODEL=PATH` names it
    hub_id: str | None
    preset: str | None
    target: str
    bits: int
    method: str
    max_seq_len: int
    bundle: str  #: the bundle folder's name, and the CI artifact's
    thresholds: dict[str, float] = field(default_factory=dict, compare=False)  #: resolved, as parity gates with

    def matrix_entry(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "recipe": self.recipe.as_posix(),
            "model": self.model,
            "hub_id": self.hub_id,
            "preset": self.preset,
            "target": self.target,
            "bits": self.bits,
            "method": self.method,
            "max_seq_len": self.max_seq_len,
        }


def method_name(method: QuantMethod) -> str:
    """The `--quant-method` name a QuantMethod came from, with its zero-point choice when not the preset's."""
    for name in ("gptq", "mse", "rtn"):
        preset = QuantMethod.named(name)
        if method == preset:
            return name
        if method == QuantMethod.named(name, not preset.asymmetric):
            return f"{name}, {'zero points' if method.asymmetric else 'no zero points'}"
    return method.describe()


def find_recipes(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(path.rglob("*.toml"))
            if not inside:
                raise UserError(f"{path}: no recipes (*.toml) in this folder")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: recipe or folder of recipes not found")
    return found


def plan_jobs(paths: list[Path]) -> list[Job]:
    """Every recipe under `paths` as a job, the longest first (a pool or CI runners then finish sooner)."""
    jobs: list[tuple[int, Job]] = []
    seen: dict[str, Path] = {}
    for path in find_recipes(paths):
        recipe = load_recipe(path)
        options = export_options_from_recipe(recipe)
        if len(options.targets) != 1:
            raise UserError(f'{path}: export.target is "all"; a release recipe names one target (one bundle per job)')
        target = options.targets[0]
        name = bundle_name(options, None, target)  # type: ignore[arg-type]  # the recipe names it: no checkpoint needed
        if name in seen:
            raise UserError(
                f"{path} and {seen[name]} both make the bundle {name}; a release needs one recipe per bundle"
            )
        seen[name] = path
        job = Job(
            recipe=path,
            model=recipe.name,
            hub_id=recipe.hub_id,
            preset=recipe.preset or None,
            target=target,
            bits=options.quant.bits,
            method=method_name(options.quant.method),
            max_seq_len=options.quant.max_seq_len,
            bundle=name,
            thresholds=resolve_thresholds(options.quant.bits, options.thresholds),
        )
        jobs.append((recipe.config().unique_params() * _TARGET_COST[target], job))
    jobs.sort(key=lambda cj: (-cj[0], cj[1].bundle))
    return [job for _, job in jobs]


def matrix_json(jobs: list[Job]) -> str:
    """The job list as one line of JSON, `{"include": [...]}`, for a CI matrix (GitHub: fromJSON)."""
    return json.dumps({"include": [job.matrix_entry() for job in jobs]}, separators=(",", ":"))


def parse_checkpoints(items: list[str] | None, jobs: list[Job]) -> dict[str, Path]:
    """`--checkpoint MODEL=PATH_OR_HUB_ID` per model of the recipes; every model needs one."""
    models = {job.model: job for job in jobs}
    out: dict[str, Path] = {}
    for item in items or []:
        model, sep, value = item.partition("=")
        if not sep or not model or not value:
            raise UserError(f"--checkpoint {item!r}: expected MODEL=PATH, e.g. MobileLLM-125M=~/models/MobileLLM-125M")
        if model not in models:
            raise UserError(
                f"--checkpoint {item!r}: no recipe is for {model}; the recipes are for {', '.join(sorted(models))}"
            )
        if model in out:
            raise UserError(f"--checkpoint: {model} is given twice")
        path = Path(value).expanduser()
        if is_hub_id(value):
            path = resolve_hub_id(value)  # the cache first, else a download; resolved once, not per job
        elif not path.exists():
            raise UserError(f"--checkpoint {item}: {path} not found")
        out[model] = path
    missing = sorted(set(models) - set(out))
    if missing:
        hub = models[missing[0]].hub_id
        raise UserError(
            f"no checkpoint for {', '.join(missing)}; pass --checkpoint {missing[0]}=PATH"
            + (f" or --checkpoint {missing[0]}={hub}" if hub else "")
            + " for each model"
        )
    return out


# ----------------------------------------------------------------------------- local runs
@dataclass
class JobResult:
    job: Job
    status: str  #: "passed", "failed" (parity; the bundle is written), "bad_input" or "internal_error"
    message: str
    seconds: float


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _export_one(recipe: Path, checkpoint: Path, output: Path) -> tuple[str, str]:
    try:
        run_export(export_options_from_recipe(load_recipe(recipe), checkpoint=checkpoint, output=output))
        return "passed", ""
    except ParityError as exc:
        return "failed", str(exc)
    except UserError as exc:
        return "bad_input", str(exc)
    except Exception as exc:  # a bug: the traceback goes to the job's log
        traceback.print_exc()
        return "internal_error", f"{type(exc).__name__}: {exc}"


def _run_job(recipe: str, checkpoint: str, output: str, threads: int, log_path: str) -> tuple[str, str, float]:
    """One job in a pool process, its output (ours and the libraries') in its own log file."""
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            status, message = _export_one(Path(recipe), Path(checkpoint), Path(output))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return status, message, time.monotonic() - t0


def run_jobs(jobs: list[Job], checkpoints: dict[str, Path], output: Path, n_jobs: int) -> list[JobResult]:
    """Every job in `n_jobs` fresh ("spawn") processes, torch threads split between them; logs in
    `output/<bundle>.log`. A parity failure is a result (its bundle is written), not an error."""
    if n_jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {n_jobs}")
    output.mkdir(parents=True, exist_ok=True)
    threads = max(1, _cpu_count() // n_jobs)
    results: list[JobResult] = []
    workers = min(n_jobs, len(jobs))
    print(f"release: {len(jobs)} job(s), {workers} at once, {threads} thread(s) each", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=one_openmp_thread_outside_torch,
    ) as pool:
        futures = {
            pool.submit(
                _run_job,
                str(job.recipe.resolve()),
                str(checkpoints[job.model].resolve()),
                str(output.resolve()),
                threads,
                str((output / f"{job.bundle}.log").resolve()),
            ): job
            for job in jobs
        }
        for future in as_completed(futures):
            job = futures[future]
            try:
                status, message, seconds = future.result()
            except Exception as exc:  # the worker process died (out of memory, killed)
                status, message, seconds = "internal_error", f"the job's process died ({type(exc).__name__})", 0.0
            results.append(JobResult(job, status, message, seconds))
            print(
                f"[{len(results)}/{len(jobs)}] {status.upper():<14} {job.bundle}  {seconds:.1f}s  "
                f"(log: {output / (job.bundle + '.log')})",
                file=sys.stderr,
                flush=True,
            )
    return sorted(results, key=lambda r: r.job.bundle)


# ----------------------------------------------------------------------------- the report
def read_release_bundle(bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and parity report of a finished bundle, checked to belong together; UserError otherwise."""
    return _read_release_bundle(open_bundle(bundle))


def _read_release_bundle(opened: Bundle) -> tuple[dict[str, Any], dict[str, Any]]:
    bundle, manifest = opened.root, opened.manifest
    summary = manifest["parity"]
    if summary is None:
        raise UserError(
            f"{bundle}: exported with --no-parity; a release needs each bundle's parity report: re-export it"
        )
    name, suffix = manifest["name"], f"-{manifest['target']}-{manifest['bits']}bit"
    if not _BUNDLE_NAME.fullmatch(name) or not name.endswith(suffix) or name == suffix:
        raise UserError(f"{bundle}: bundle name {name!r} is not <model>{suffix}; is this a bundle of mobilellm-export?")
    if summary["report"] != "parity.json":
        raise UserError(f"{bundle}: manifest.json names the parity report {summary['report']!r}, not parity.json")
    path = bundle / "parity.json"
    try:
        report = json.loads(path.read_text())
        jsonschema.validate(report, json.loads(PARITY_SCHEMA_PATH.read_text()))
    except (OSError, json.JSONDecodeError, jsonschema.ValidationError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: missing or not a parity report ({first}); re-export the bundle") from None
    mine = (name, manifest["target"], manifest["bits"], summary["passed"])
    if (report["bundle"], report["target"], report["bits"], report["passed"]) != mine:
        raise UserError(f"{path}: does not match {bundle / MANIFEST} (bundle, target, bits or verdict); re-export it")
    if not (bundle / "parity.md").is_file():
        raise UserError(f"{bundle}: no parity.md; re-export the bundle")
    return manifest, report


def recheck(bundle: Path | Bundle, report: dict[str, Any]) -> list[str]:
    """Parity re-run on this machine from the bundle's golden data, with the thresholds it was gated with
    (as `validate` runs it; the bundle is not written to). Returns the failures; UserError for a bundle
    whose bytes differ from its manifest (refused by `open_bundle` before anything is parsed) or whose
    artifact does not load."""
    with tempfile.TemporaryDirectory() as tmp:
        result, _ = validate_bundle(bundle, thresholds=report["thresholds"], report_dir=Path(tmp))
    return [] if result.passed else result.failures()


def release_entry(
    bundle: Path, manifest: dict[str, Any], report: dict[str, Any], rechecked: list[str]
) -> dict[str, Any]:
    summary = manifest["parity"]
    failures = list(summary["failures"])
    if summary["passed"]:  # passed at export, failed here: the release fails, saying why
        failures += [f"re-check: {f}" for f in rechecked]
    return {
        "bundle": manifest["name"],
        "model": manifest["name"].removesuffix(f"-{manifest['target']}-{manifest['bits']}bit"),
        "target": manifest["target"],
        "bits": manifest["bits"],
        "embedding_bits": manifest["embedding_bits"],
        "method": method_name(QuantMethod.from_dict(manifest["quantization"]["method"])),
        "max_context": manifest["max_context"],
        "bytes": artifact_bytes(manifest["files"], manifest["artifact"]),
        "manifest_sha256": sha256_file(bundle / MANIFEST),
        "parity": {
            "passed": bool(summary["passed"]) and not rechecked,
            "ppl_delta_vs_reference": summary["ppl_delta_vs_reference"],
            "top1_vs_reference": summary["top1_vs_reference"],
            "top1_vs_twin": summary["top1_vs_twin"],
            "kl_vs_reference": report["overall"]["reference"]["kl_divergence"],
            "kl_vs_twin": report["overall"]["twin"]["kl_divergence"],
            "failures": failures,
        },
        "tool": manifest["tool"],
    }


def _entry_key(entry: dict[str, Any]) -> tuple[str, str, int]:
    return entry["model"], entry["target"], entry["bits"]


def build_report(entries: list[dict[str, Any]], missing: list[Job]) -> dict[str, Any]:
    entries = sorted(entries, key=_entry_key)
    gone = sorted(
        ({"bundle": j.bundle, "model": j.model, "target": j.target, "bits": j.bits} for j in missing), key=_entry_key
    )
    failed = sum(not e["parity"]["passed"] for e in entries)
    return {
        "schema": RELEASE_SCHEMA,
        "schema_version": RELEASE_SCHEMA_VERSION,
        "passed": not failed and not gone,
        "counts": {"bundles": len(entries), "passed": len(entries) - failed, "failed": failed, "missing": len(gone)},
        "bundles": entries,
        "missing": gone,
    }


def _pct(x: float, signed: bool = False) -> str:
    return f"{x * 100:+.2f}%" if signed else f"{x * 100:.1f}%"


def markdown(report: dict[str, Any], links: dict[str, str], charts: dict[str, list[str]] | None = None) -> str:
    """One table, failures (and missing bundles) first, each bundle linked to its parity.md and to its
    pictures (`charts`: per bundle, links to parity.png and size.png where the bundle has them)."""
    charts = charts or {}
    c = report["counts"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        "# Release",
        "",
        f"**{verdict}**: {c['passed']} of {c['bundles'] + c['missing']} bundles passed parity, {c['failed']} failed, "
        f"{c['missing']} missing. Machine-readable: `release.json` (schema `{report['schema']}` "
        f"v{report['schema_version']}).",
        "",
        "| parity | bundle (parity report) | target | bits | method | size | perplexity vs reference "
        "| top-1 vs reference / twin | KL vs reference / twin | failed checks | charts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["missing"]:
        lines.append(
            f"| **MISSING** | {m['bundle']} | {m['target']} | {m['bits']} | | | | | | no bundle: its export did not finish | |"
        )
    for e in sorted(report["bundles"], key=lambda e: (e["parity"]["passed"], *_entry_key(e))):
        p = e["parity"]
        status = "pass" if p["passed"] else "**FAIL**"
        failures = "; ".join(p["failures"][:2]) + (
            f" (+{len(p['failures']) - 2} more)" if len(p["failures"]) > 2 else ""
        )
        lines.append(
            f"| {status} | [{e['bundle']}]({links[e['bundle']]}) | {e['target']} | {e['bits']} | {e['method']} "
            f"| {human(e['bytes'])} | {_pct(p['ppl_delta_vs_reference'], True)} "
            f"| {_pct(p['top1_vs_reference'])} / {_pct(p['top1_vs_twin'])} "
            f"| {p['kl_vs_reference']:.3g} / {p['kl_vs_twin']:.3g} | {failures.replace('|', '/')} "
            f"| {' · '.join(charts.get(e['bundle'], []))} |"
        )
    tools = sorted({json.dumps(e["tool"], sort_keys=True) for e in report["bundles"]})
    if len(tools) == 1:
        lines += ["", "Tools: " + ", ".join(f"{k} {v}" for k, v in sorted(json.loads(tools[0]).items())) + "."]
    elif tools:
        lines += ["", "**Tool versions differ between bundles**:"]
        for e in report["bundles"]:
            lines.append(f"- {e['bundle']}: " + ", ".join(f"{k} {v}" for k, v in sorted(e["tool"].items())))
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], bundles: dict[str, Path], output: Path) -> None:
    problem = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(json.loads(RELEASE_SCHEMA_PATH.read_text())).iter_errors(report)
    )
    if problem is not None:  # our own output breaking our schema is a bug
        raise RuntimeError(f"release.json does not match {RELEASE_SCHEMA_PATH.name}: {problem.message}")
    output.mkdir(parents=True, exist_ok=True)
    links = {
        name: Path(os.path.relpath(path.resolve() / "parity.md", output.resolve())).as_posix()
        for name, path in bundles.items()
    }
    charts = {
        name: [
            f"[{label}]({Path(os.path.relpath(path.resolve() / picture, output.resolve())).as_posix()})"
            for picture, label in (("parity.png", "parity"), ("size.png", "bytes"))
            if (path / picture).is_file()
        ]
        for name, path in bundles.items()
    }
    write_json(output / RELEASE_JSON, report)
    (output / RELEASE_MD).write_text(markdown(report, links, charts))


@dataclass
class Outcome:
    report: dict[str, Any]
    code: int  #: 0 all passed, 1 a parity failure or a missing bundle, 2 bad input, 3 an internal error
    errors: list[str]  #: one line per job that could not export


def _outcome(report: dict[str, Any], errors: list[str], code: int) -> Outcome:
    return Outcome(report, code or (0 if report["passed"] else 1), errors)


def release(jobs: list[Job], checkpoints: dict[str, Path], output: Path, n_jobs: int) -> Outcome:
    """Export every job, then report on the bundles written (a parity failure still writes its bundle)."""
    results = run_jobs(jobs, checkpoints, output, n_jobs)
    # A bundle that failed parity is written beside the last good one, as NAME.failed (pipeline.failed_path).
    written = {
        r.job.bundle: output / r.job.bundle if r.status == "passed" else failed_path(output / r.job.bundle)
        for r in results
        if r.status in ("passed", "failed")
    }
    entries = []
    for bundle in written.values():
        manifest, report = read_release_bundle(bundle)  # every file checked against its sha256 (open_bundle)
        entries.append(release_entry(bundle, manifest, report, []))
    broken = [r for r in results if r.status in ("bad_input", "internal_error")]
    report = build_report(entries, [r.job for r in broken])
    write_report(report, written, output)
    errors = [f"{r.job.recipe}: {r.message} (log: {output / (r.job.bundle + '.log')})" for r in broken]
    code = 3 if any(r.status == "internal_error" for r in broken) else (2 if broken else 0)
    return _outcome(report, errors, code)


def find_bundles(paths: list[Path]) -> list[Path]:
    """Each path is a bundle (it has manifest.json) or a folder of bundles (hidden folders, e.g. an
    interrupted export's staging dir, are skipped; any other folder is refused)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: not a bundle or a folder of bundles")
        if (path / MANIFEST).is_file():
            found.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        for sub in inside:
            if not (sub / MANIFEST).is_file():
                raise UserError(f"{sub}: not a bundle (no {MANIFEST}); pass bundles or folders holding only bundles")
        if not inside:
            raise UserError(f"{path}: no bundles in this folder")
        found += inside
    return found


def merge(paths: list[Path], output: Path, expected: list[Job] | None) -> Outcome:
    """The report over bundles exported elsewhere, each re-checked as `validate` does. With `expected`
    (the release's recipes), a bundle no recipe makes, or made with other choices, is refused, and a
    recipe without its bundle fails the release."""
    by_name = {job.bundle: job for job in expected} if expected is not None else None
    bundles: dict[str, Path] = {}
    read: list[tuple[Path, Bundle, dict[str, Any], dict[str, Any]]] = []
    for bundle in find_bundles(paths):  # every bundle's checks first: bad input fails before any parity run
        opened = open_bundle(bundle)  # sha256 of every file, once: the re-check below reuses it
        manifest, report = _read_release_bundle(opened)
        name = manifest["name"]
        if name in bundles:
            raise UserError(f"{bundle} and {bundles[name]} are both the bundle {name}; pass each bundle once")
        if by_name is not None:
            _check_expected(bundle, manifest, report, by_name)
        bundles[name] = bundle
        read.append((bundle, opened, manifest, report))
    entries = []
    for i, (bundle, opened, manifest, report) in enumerate(read, 1):
        print(f"merge: [{i}/{len(read)}] re-checking {bundle}", file=sys.stderr, flush=True)
        entries.append(release_entry(bundle, manifest, report, recheck(opened, report)))
    missing = [job for name, job in (by_name or {}).items() if name not in bundles]
    report = build_report(entries, missing)
    write_report(report, bundles, output)
    return _outcome(report, [], 0)


def _check_expected(bundle: Path, manifest: dict[str, Any], report: dict[str, Any], by_name: dict[str, Job]) -> None:
    job = by_name.get(manifest["name"])
    if job is None:
        raise UserError(f"{bundle}: bundle {manifest['name']} is made by none of the expected recipes")
    have = {
        "target": manifest["target"],
        "bits": manifest["bits"],
        "method": method_name(QuantMethod.from_dict(manifest["quantization"]["method"])),
        "max_seq_len": manifest["max_context"],
        "thresholds": report["thresholds"],
    }
    want = {key: getattr(job, key) for key in have}
    diffs = [f"{key} {have[key]!r} (recipe: {want[key]!r})" for key in have if have[key] != want[key]]
    if diffs:
        raise UserError(f"{bundle}: not exported with {job.recipe}: {', '.join(diffs)}; re-export it with the recipe")
