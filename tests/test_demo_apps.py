"""The demo apps (android_demo/, ios_demo/): the manifest keys they read, and their code as far as it builds here.

Neither app can be built here (no Android SDK, no Xcode, no Swift toolchain, no Maven). What is checked:

- every manifest.json key each app reads (Kotlin: the `Manifest` accessors called with a literal key path;
  Swift: the `CodingKeys` of the Codable structs marked `// manifest-path: ...`) exists in
  exporter/schemas/manifest.schema.json and, unless the app treats it as optional, is required there and
  present (non-null) in the manifest of a real bundle: the embedded default model exported to ExecuTorch at
  4 bits, once per run (if that export fails, the real-bundle test fails and says why);
- the apps hard-code no bundle file names or tensor names, and the Android app links the executorch-android
  release equal to the `executorch` the exporter pins;
- the Android app compiles with `kotlinc` (platform-free core for real, Android/ExecuTorch calls against
  the API stubs in android_demo/core-tests/stubs) and its main-based test runner passes: JSON, manifest,
  bundle validation, sampling, stop rules, context budget, tokens/s, the SentencePiece tokenizer against the
  Python `sentencepiece` package on held-out text and Unicode edge cases, and the exported bundle;
- the Swift sources parse with tree-sitter's Swift grammar (skipped without `tree-sitter-swift`).

`kotlinc` comes from Debian's `kotlin` package (`apt-get install -y kotlin`); without it the Kotlin test
fails (it is not skipped) and says so.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ANDROID = ROOT / "android_demo"
IOS = ROOT / "ios_demo"
SCHEMA = json.loads((ROOT / "exporter" / "schemas" / "manifest.schema.json").read_text())
CORE_KT = ANDROID / "app" / "src" / "main" / "java" / "org" / "mobilellm" / "demo" / "core"
CORE_TESTS_KT = ANDROID / "core-tests" / "CoreTests.kt"
TOKENIZER = ROOT / "exporter" / "assets" / "default_model" / "tokenizer.model"

# Kotlin: Manifest accessors called with a literal key path ("model.vocab_size").
KT_ACCESSOR = re.compile(
    r"\b(string|int|long|double|bool|optBool|intList|stringList|tensors|fileEntries|has)\(\s*\"([A-Za-z0-9_.]+)\"\s*\)"
)
TENSOR_FIELDS = ("name", "dtype", "shape")
FILE_FIELDS = ("sha256", "bytes")


# ------------------------------------------------------------------------------------------ key extraction
def android_sources() -> list[Path]:
    return sorted(p for p in (ANDROID / "app" / "src" / "main").rglob("*.kt"))


def swift_sources() -> list[Path]:
    return sorted((IOS / "MobileLLMDemo").rglob("*.swift"))


def kotlin_manifest_keys() -> dict[str, bool]:
    """Key paths the Android app reads -> required? (False for accessors that tolerate absence)."""
    keys: dict[str, bool] = {}
    for path in android_sources():
        text = _strip_comments(path.read_text())
        for accessor, key in KT_ACCESSOR.findall(text):
            required = accessor not in ("has", "tensors", "optBool")
            keys[key] = keys.get(key, False) or required
            if accessor == "optBool":  # parent may be null (parity with --no-parity) but the key is in the schema
                keys.setdefault(key, False)
            if accessor == "tensors":
                for f in TENSOR_FIELDS:
                    keys[f"{key}[].{f}"] = True
            if accessor == "fileEntries":
                for f in FILE_FIELDS:
                    keys[f"{key}{{}}.{f}"] = True
    return keys


SWIFT_STRUCT = re.compile(r"struct\s+(\w+)\s*:[^{]*\bCodable\b[^{]*\{[ \t]*//\s*manifest-path:\s*(\S+)")
SWIFT_CODING_KEYS = re.compile(r"enum\s+CodingKeys\s*:\s*String\s*,\s*CodingKey\s*\{(.*?)\}", re.S)
SWIFT_CASE_ITEM = re.compile(r"^\s*(\w+)(?:\s*=\s*\"([^\"]+)\")?\s*$")
SWIFT_PROPERTY = re.compile(r"^\s*(?:public\s+)?(?:let|var)\s+(\w+)\s*:\s*([^=\n{]+)", re.M)


def swift_manifest_keys() -> dict[str, bool]:
    """Key paths the iOS app decodes -> required? (optional Swift properties are not required)."""
    keys: dict[str, bool] = {}
    for path in swift_sources():
        text = _strip_comments(path.read_text(), keep_marker=True)
        for m in SWIFT_STRUCT.finditer(text):
            body = _balanced_block(text, m.start() + m.group(0).index("{"))
            ck = SWIFT_CODING_KEYS.search(body)
            assert ck, f"{path.name}: struct {m.group(1)} is marked manifest-path but has no CodingKeys enum"
            optional = {name: typ.strip().endswith("?") for name, typ in SWIFT_PROPERTY.findall(body)}
            for prefix in m.group(2).split(","):
                prefix = "" if prefix == "." else prefix
                for line in ck.group(1).splitlines():
                    line = line.strip()
                    if not line.startswith("case "):
                        continue
                    for item in line[len("case ") :].split(","):
                        im = SWIFT_CASE_ITEM.match(item)
                        assert im, f"{path.name}: cannot read CodingKeys item {item!r}"
                        prop, raw = im.group(1), im.group(2) or im.group(1)
                        assert prop in optional, f"{path.name}: CodingKeys case {prop} has no stored property"
                        keys[f"{prefix}.{raw}" if prefix else raw] = not optional[prop]
    return keys


def _balanced_block(text: str, open_index: int) -> str:
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index : i + 1]
    raise AssertionError("unbalanced braces")


def _strip_comments(text: str, keep_marker: bool = False) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        idx = line.find("//")
        if idx >= 0 and not (keep_marker and "manifest-path:" in line[idx:]) and not _in_string(line, idx):
            line = line[:idx]
        out.append(line)
    return "\n".join(out)


def _in_string(line: str, idx: int) -> bool:
    return line[:idx].count('"') % 2 == 1


# ------------------------------------------------------------------------------------------ key resolution
def _deref(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        assert ref.startswith("#/$defs/"), ref
        return SCHEMA["$defs"][ref.split("/")[-1]]
    return node


def schema_node(key: str) -> tuple[bool, bool]:
    """(exists, required) of a key path in the manifest schema; `[]` = array items, `{}` = map values.

    `required` is relative to the key's parent: whether an object that holds the parent must hold the key.
    """
    node: dict[str, Any] | None = SCHEMA
    required = True
    for seg in _segments(key):
        if node is None:  # below a key the schema leaves open (e.g. model.dim): nothing more to check
            return True, True
        node = _deref(node)
        if "oneOf" in node:  # parity: null or an object
            node = next(_deref(n) for n in node["oneOf"] if _deref(n).get("type") == "object")
        if seg in ("[]", "{}"):
            node = node.get("items" if seg == "[]" else "additionalProperties")
            required = True
            continue
        props, req = node.get("properties", {}), node.get("required", [])
        if seg not in props and seg not in req:
            return False, False
        required = seg in req
        node = props.get(seg)
    return True, required


def ancestors(key: str) -> list[str]:
    """'io.states[].name' -> ['io', 'io.states', 'io.states[]']."""
    out: list[str] = []
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix.endswith("[]") or prefix.endswith("{}"):
            out.append(prefix[:-2])
        out.append(prefix)
    return out


def missing_from(manifest: dict[str, Any], keys: dict[str, bool]) -> list[str]:
    """Required keys absent from a real manifest (unless an ancestor the app treats as optional is absent)."""
    missing = []
    for key, required in keys.items():
        if not required:
            continue
        if any(keys.get(a) is False and not manifest_has(manifest, a) for a in ancestors(key)):
            continue
        if not manifest_has(manifest, key):
            missing.append(key)
    return missing


def _segments(key: str) -> list[str]:
    segs: list[str] = []
    for part in key.split("."):
        while part.endswith("[]") or part.endswith("{}"):
            segs.append(part[:-2])
            segs.append(part[-2:])
            part = ""
        if part:
            segs.append(part)
    return [s for s in segs if s]


def manifest_has(manifest: Any, key: str) -> bool:
    """Whether `key` has a non-null value in a real manifest (for `[]`/`{}`: in every element, and there is one)."""
    values = [manifest]
    for seg in _segments(key):
        nxt = []
        for v in values:
            if seg == "[]":
                if not isinstance(v, list) or not v:
                    return False
                nxt.extend(v)
            elif seg == "{}":
                if not isinstance(v, dict) or not v:
                    return False
                nxt.extend(v.values())
            else:
                if not isinstance(v, dict) or seg not in v:
                    return False
                nxt.append(v[seg])
        values = nxt
    return all(v is not None for v in values)


# ------------------------------------------------------------------------------------------ the real bundle
@pytest.fixture(scope="session")
def real_bundle(default_bundles: dict[str, Path]) -> Path:
    """The embedded default model exported to ExecuTorch at 4 bits (shared with the end-to-end tests)."""
    return default_bundles["executorch"]


# ------------------------------------------------------------------------------------------ tests: keys
def test_apps_read_manifest_through_recognisable_accessors() -> None:
    kt, sw = kotlin_manifest_keys(), swift_manifest_keys()
    # The names and numbers the brief requires the apps to take from manifest.json.
    for key in ("target", "artifact", "tokenizer", "bos_id", "eos_ids", "max_context", "vocab_size", "files"):
        assert key in kt, f"android_demo reads no '{key}' from manifest.json"
    for key in (
        "target",
        "artifact",
        "tokenizer",
        "bos_id",
        "eos_ids",
        "max_context",
        "vocab_size",
        "io.inputs[].name",
        "io.inputs[].dtype",
        "io.outputs[].name",
        "io.outputs[].dtype",
        "io.states[].name",
    ):
        assert key in sw, f"ios_demo decodes no '{key}' from manifest.json"


@pytest.mark.parametrize("app", ["android", "ios"])
def test_manifest_keys_exist_in_schema(app: str) -> None:
    keys = kotlin_manifest_keys() if app == "android" else swift_manifest_keys()
    missing = [k for k in keys if not schema_node(k)[0]]
    assert not missing, f"{app} app reads keys the manifest schema does not define: {missing}"
    # A key the app requires must be required by the schema where its parent exists (else some valid
    # bundle lacks it and the app would refuse it).
    loose = [k for k, required in keys.items() if required and not schema_node(k)[1]]
    assert not loose, f"{app} app requires keys the schema marks optional (make them optional in the app): {loose}"


@pytest.mark.parametrize("app", ["android", "ios"])
@pytest.mark.xdist_group("default_bundles")
def test_manifest_keys_exist_in_real_bundle(app: str, real_bundle: Path) -> None:
    manifest = json.loads((real_bundle / "manifest.json").read_text())
    keys = kotlin_manifest_keys() if app == "android" else swift_manifest_keys()
    missing = missing_from(manifest, keys)
    assert not missing, f"{app} app reads keys missing from {real_bundle.name}/manifest.json: {missing}"
    assert manifest["target"] == "executorch"
    assert (real_bundle / manifest["artifact"]).is_file() and (real_bundle / manifest["tokenizer"]).is_file()


def test_apps_hard_code_no_bundle_names() -> None:
    """File names, Core ML tensor names and ids come from manifest.json, not from string literals."""
    literals = re.compile(
        r"\"(model\.pte|model\.mlpackage|model\.onnx|tokenizer\.model|tokenizer\.json|tokens|input_pos|logits)\""
    )
    offenders = []
    for path in android_sources() + swift_sources():
        for n, line in enumerate(_strip_comments(path.read_text()).splitlines(), 1):
            if literals.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "hard-coded bundle names (read them from manifest.json):\n" + "\n".join(offenders)


def test_executorch_android_version_matches_exporter() -> None:
    """The AAR the app links must be the runtime release of the executorch the exporter pins."""
    gradle = (ANDROID / "app" / "build.gradle.kts").read_text()
    m = re.search(r"org\.pytorch:executorch-android:([0-9][^\"']*)", gradle)
    assert m, "app/build.gradle.kts does not depend on org.pytorch:executorch-android"
    assert m.group(1) == importlib.metadata.version("executorch"), (
        m.group(1),
        importlib.metadata.version("executorch"),
    )
    ios_readme = (IOS / "README.md").read_text()
    assert f"swiftpm-{importlib.metadata.version('executorch')}" in ios_readme


def test_swift_sources_parse() -> None:
    """No Swift compiler can be installed here; tree-sitter's Swift grammar at least catches syntax errors.

    Needs the `tree-sitter` and `tree-sitter-swift` packages (PyPI) in the test extras.
    """
    ts = pytest.importorskip(
        "tree_sitter", reason="pip install tree-sitter tree-sitter-swift to syntax-check the iOS demo"
    )
    tss = pytest.importorskip("tree_sitter_swift", reason="pip install tree-sitter-swift to syntax-check the iOS demo")
    parser = ts.Parser(ts.Language(tss.language()))
    problems = []
    for path in sorted(IOS.rglob("*.swift")):
        src = path.read_bytes()
        stack = [parser.parse(src).root_node]
        while stack:
            node = stack.pop()
            if node.type == "ERROR" or node.is_missing:
                line = src.decode().splitlines()[node.start_point[0]]
                problems.append(f"{path.relative_to(ROOT)}:{node.start_point[0] + 1}: {line.strip()[:100]}")
            stack.extend(node.children)
    assert not problems, "Swift syntax errors:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------ tests: Kotlin
def tokenizer_cases() -> list[dict[str, Any]]:
    """Texts with the ids and decoded text the reference `sentencepiece` gives for them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    heldout = (ROOT / "exporter" / "assets" / "heldout.txt").read_text()
    texts = [s.strip() for s in re.split(r"(?<=[.;:?!])\s+", heldout) if s.strip()][:300]
    texts += [
        "",
        " ",
        "hello",
        "  leading and   inner   spaces  ",
        "tabs\tand\nnewlines\r\nhere",
        "Numbers 12345 and 3.14159",
        "café naïve résumé",
        "Grüße aus Köln",
        "日本語のテキスト",
        "emoji 🙂👍🏽 done",
        "ﬁne ligature and ＡＢＣ full width",
        "x" * 200,
        "The LORD said unto Moses,",
        "punctuation!?;:'\"()[]{}<>",
        "<s> and </s> are text here",
        "ĀāĂăĄą ǅ",
        "mixed 中文 and English",
        "\u00a0non-breaking\u00a0space",
        "a\u0301 combining accent",
        "zero\u200bwidth",
        # sentencepiece's nmt_nfkc rules: removed controls, extra spaces, and characters it keeps
        "ctl\x01\x08\x0b\x0e\x1f\x7f\x8f\x9f end",
        "sp\u1680\u200c\u200e\u200f\u2028\u2029\u2581\ufeff\ufffd end",
        "kept\u200d\u00ad\u0085\u2060\u180e end",
        "wide\u3000\u2007\u202f\u205f\u2000 spaces",
        "\t\n  \r\n",
    ]
    cases = []
    for t in texts:
        ids = sp.encode(t)
        cases.append({"text": t, "ids": ids, "decoded": sp.decode(ids)})
    return cases


def kotlin_classpath_stdlib() -> str:
    for cand in ("/usr/share/java/kotlin-stdlib.jar",):
        if Path(cand).is_file():
            return cand
    kotlinc = shutil.which("kotlinc")
    assert kotlinc, "kotlinc not found"
    home = Path(os.path.realpath(kotlinc)).parents[1]
    for cand in (home / "lib" / "kotlin-stdlib.jar",):
        if cand.is_file():
            return str(cand)
    raise AssertionError("kotlin-stdlib.jar not found next to kotlinc")


@pytest.mark.xdist_group("default_bundles")
def test_android_kotlin_compiles_and_core_tests_pass(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """One kotlinc run over the whole app: the platform-free core, the Android UI/engine code type-checked
    against API stubs (android_demo/core-tests/stubs: the android.* and ExecuTorch AAR signatures the app
    calls), and the main-based test runner, which then runs on the JVM, on the exported bundle too when
    the export works (when it does not, test_manifest_keys_exist_in_real_bundle fails and says why)."""
    kotlinc = shutil.which("kotlinc")
    assert kotlinc, (
        "kotlinc is not on PATH: the Android demo's Kotlin cannot be compiled and tested. "
        "Install it with `apt-get install -y kotlin` (Debian's Kotlin 1.3.31 works with JDK 17)."
    )
    javac, java = shutil.which("javac"), shutil.which("java")
    assert javac and java, "a JDK (javac, java) is needed next to kotlinc: `apt-get install -y default-jdk-headless`"
    for src in CORE_KT.glob("*.kt"):
        assert "import android" not in src.read_text(), f"{src} must stay platform-free (no android.* imports)"

    stubs_src = sorted(str(p) for p in (ANDROID / "core-tests" / "stubs").rglob("*.java"))
    stubs = tmp_path / "stubs"
    proc = subprocess.run([javac, "-nowarn", "-d", str(stubs), *stubs_src], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"javac failed on the API stubs:\n{proc.stderr[-4000:]}"

    sources = [str(p) for p in android_sources()] + [str(CORE_TESTS_KT)]
    jar = tmp_path / "app.jar"
    t0 = time.time()
    proc = subprocess.run(
        [kotlinc, "-cp", str(stubs), *sources, "-d", str(jar)], capture_output=True, text=True, timeout=900
    )
    compile_s = time.time() - t0
    errors = [
        line for line in (proc.stdout + proc.stderr).splitlines() if ": error:" in line or line.startswith("error:")
    ]
    assert proc.returncode == 0 and jar.is_file(), f"kotlinc failed ({compile_s:.0f}s):\n" + "\n".join(
        errors or [proc.stderr[-4000:]]
    )
    print(f"kotlinc compiled {len(sources)} files in {compile_s:.1f}s")

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(tokenizer_cases(), ensure_ascii=False))
    try:
        bundle_args = ["--bundle", str(request.getfixturevalue("real_bundle"))]
    except pytest.fail.Exception:
        bundle_args = []
    run = subprocess.run(
        [
            java,
            "-cp",
            os.pathsep.join([str(jar), kotlin_classpath_stdlib()]),
            "org.mobilellm.demo.core.tests.CoreTestsKt",
            "--tokenizer",
            str(TOKENIZER),
            "--cases",
            str(cases),
            *bundle_args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(run.stdout)
    assert run.returncode == 0, f"Kotlin core tests failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    last = run.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"(\d+) passed, 0 failed", last)
    assert m and int(m.group(1)) >= (17 if bundle_args else 15), f"unexpected summary: {last!r}"
