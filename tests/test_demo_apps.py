"""The demo apps (android_demo/, ios_demo/): the manifest keys they read, and their code as far as it builds here.

Neither app can be built here (no Android SDK, no Xcode, no Swift toolchain, no Maven). What is checked:

- every manifest.json key each app reads (Kotlin: the `Manifest` accessors called with a literal key path;
  Swift: the `CodingKeys` of the Codable structs marked `// manifest-path: ...`) exists in
  exporter/schemas/manifest.schema.json and, unless the app treats it as optional, is required there and
  present (non-null) in the manifest of a real bundle of each target the app runs: the embedded default
  model exported at 4 bits, once per run (if that export fails, the real-bundle tests fail and say why);
- the apps hard-code no bundle file names or tensor names; the Android app links the executorch-android
  release equal to the `executorch` the exporter pins and the onnxruntime-genai-android release of the
  `onnxruntime-genai` it pins; the iOS app pins one swift-transformers release in Package.swift and project.yml;
- the apps carry no tokenizer of their own: ExecuTorch's LlmModule / TextRunner, onnxruntime-genai's
  Tokenizer and swift-transformers' AutoTokenizer tokenize; manifests are read with org.json (Android) and
  Foundation's JSONDecoder (iOS), not a hand-written parser;
- the Android app compiles with `kotlinc` (platform-free core for real, against org.json; Android, ExecuTorch
  and onnxruntime-genai calls against the API stubs in android_demo/core-tests/stubs) and its main-based test
  runner passes: manifest reading through org.json, bundle validation, the BOS rule, stop rules, context
  budget, tokens/s, runner stats, and the exported ExecuTorch and ONNX bundles (their tokenizer.json BOS
  template and genai_config.json against the manifest);
- the Swift sources parse with tree-sitter's Swift grammar (skipped without `tree-sitter-swift`).

`kotlinc` comes from Debian's `kotlin` package and org.json from `libandroid-json-java` (Android's own
org.json from AOSP libcore; `apt-get install -y kotlin libandroid-json-java`, done by `make setup`); without
them the Kotlin test fails (it is not skipped) and says so.
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
# org.json on a plain JVM: Debian's libandroid-json-java (Android's own org.json, AOSP libcore) first.
ORG_JSON_JARS = ("/usr/share/java/com.android.json.jar", "/usr/share/java/json.jar")

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


# The targets each app runs: Android ExecuTorch (LlmModule) and ONNX (onnxruntime-genai); iOS Core ML and,
# with the ExecuTorch Swift package linked, ExecuTorch (TextRunner).
APP_TARGETS = {"android": ("executorch", "onnx"), "ios": ("executorch", "coreml")}


@pytest.mark.parametrize(("app", "target"), [(app, t) for app, targets in APP_TARGETS.items() for t in targets])
@pytest.mark.xdist_group("default_bundles")
def test_manifest_keys_exist_in_real_bundle(app: str, target: str, default_bundles: dict[str, Path]) -> None:
    bundle = default_bundles[target]
    manifest = json.loads((bundle / "manifest.json").read_text())
    keys = kotlin_manifest_keys() if app == "android" else swift_manifest_keys()
    missing = missing_from(manifest, keys)
    assert not missing, f"{app} app reads keys missing from {bundle.name}/manifest.json: {missing}"
    assert manifest["target"] == target
    assert (bundle / manifest["artifact"]).exists() and (bundle / manifest["tokenizer"]).is_file()
    # The runtimes' and libraries' tokenizers read tokenizer.json + tokenizer_config.json beside the original.
    assert {"tokenizer.json", "tokenizer_config.json", manifest["tokenizer"]} <= set(manifest["files"])


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


def test_genai_android_version_matches_exporter() -> None:
    """The onnxruntime-genai AAR the Android app links is the release line the exporter validates ONNX bundles with
    (onnxruntime-genai is not on Maven Central: the AAR comes from the GitHub release; ONNX Runtime from Maven)."""
    gradle = (ANDROID / "app" / "build.gradle.kts").read_text()
    m = re.search(r'val genaiVersion = "([0-9][^"]*)"', gradle)
    assert m, "app/build.gradle.kts pins no onnxruntime-genai-android version (val genaiVersion)"
    assert 'file("libs/onnxruntime-genai-android-$genaiVersion.aar")' in gradle
    assert "releases/download/v$genaiVersion/onnxruntime-genai-android-$genaiVersion.aar" in gradle
    assert "implementation(files(genaiAar))" in gradle
    assert re.search(r"com\.microsoft\.onnxruntime:onnxruntime-android:[0-9]", gradle), "no onnxruntime-android"
    pinned = importlib.metadata.version("onnxruntime-genai")
    assert m.group(1).split(".")[:2] == pinned.split(".")[:2], (m.group(1), pinned)


SWIFT_TRANSFORMERS = "https://github.com/huggingface/swift-transformers"


def test_swift_transformers_pinned_in_package_and_project() -> None:
    """Package.swift (swift test) and project.yml (the app) take swift-transformers' Tokenizers from one release."""
    package = (IOS / "Package.swift").read_text()
    project = (IOS / "project.yml").read_text()
    pm = re.search(r'\.package\(url: "' + re.escape(SWIFT_TRANSFORMERS) + r'", from: "(\d+\.\d+\.\d+)"\)', package)
    assert pm, "Package.swift does not depend on swift-transformers from a tagged version"
    assert '.product(name: "Tokenizers", package: "swift-transformers")' in package
    ym = re.search(
        r"^  swift-transformers:\n    url: " + re.escape(SWIFT_TRANSFORMERS) + r"\n    from: (\d+\.\d+\.\d+)$",
        project,
        re.M,
    )
    assert ym, "project.yml has no packages: swift-transformers entry (url + from)"
    assert pm.group(1) == ym.group(1), (pm.group(1), ym.group(1))
    assert re.search(r"^      - package: swift-transformers\n        product: Tokenizers$", project, re.M)


# A tokenizer implementation: its types, its entry points, or the SentencePiece / BPE details it handles.
TOKENIZER_TYPE = re.compile(
    r"\b(?:class|struct|object|enum|protocol|interface|actor)\s+\w*(?:Tokenizer|SentencePiece|Bpe|BPE|Unigram|Merge)\w*"
)
# (Swift's Codable `encode(to:)` / `init(from:)` are JSON, not text.)
TOKENIZER_FUNC = re.compile(
    r"\b(?:fun|func)\s+(?:encode(?!\(to )|decode(?!\(from )|tokenize|detokenize|bpe\w*|merge\w*)\s*[(<]"
)
TOKENIZER_DETAIL = re.compile(r"\u2581|\\u2581|\\u\{2581\}|<0x|ModelProto|byte_?[fF]allback|\bmerges\b|\bpieces\b")


def app_sources() -> list[Path]:
    """The apps' own code (not the API stubs that stand in for the platform and the runtimes)."""
    return android_sources() + [CORE_TESTS_KT] + sorted(IOS.rglob("*.swift"))


def test_apps_carry_no_tokenizer() -> None:
    """Tokenizing is the runtime's or a maintained library's job: no hand-ported tokenizer in either app."""
    offenders = []
    for path in app_sources():
        name = path.stem.lower()
        if any(w in name for w in ("tokenizer", "sentencepiece", "bpe", "unigram")):
            offenders.append(f"{path.relative_to(ROOT)}: a tokenizer source file")
        for n, line in enumerate(_strip_comments(path.read_text()).splitlines(), 1):
            for rx in (TOKENIZER_TYPE, TOKENIZER_FUNC, TOKENIZER_DETAIL):
                if rx.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not offenders, "tokenizer code in the demo apps (use the runtime's / library's tokenizer):\n" + "\n".join(
        offenders
    )


def _code(path: Path) -> str:
    return _strip_comments(path.read_text())


def test_apps_tokenize_with_runtime_or_library() -> None:
    """Android: ExecuTorch's LlmModule gets the bundle's tokenizer file, onnxruntime-genai's Tokenizer is told to
    add BOS; iOS: swift-transformers' AutoTokenizer reads the bundle folder (Core ML), ExecuTorch's TextRunner gets
    the tokenizer file and one BOS."""
    engines = _code(ANDROID / "app" / "src" / "main" / "java" / "org" / "mobilellm" / "demo" / "Engines.kt")
    assert "import org.pytorch.executorch.extension.llm.LlmModule" in engines
    assert re.search(r"LlmModule\(bundle\.modelFile\.absolutePath, bundle\.tokenizerFile\.absolutePath,", engines)
    assert "val tokenizerFile: File = File(dir, manifest.tokenizer)" in engines
    # numBos = 1: the runner's default is 0 BOS, MobileLLM is trained with BOS first.
    assert re.search(r"module\.generate\(prompt, \w+, callback, false, temperature, 1, 0\)", engines)
    assert "import ai.onnxruntime.genai.Tokenizer" in engines and "Tokenizer(model)" in engines
    assert 'options["add_special_tokens"] = "true"' in engines and "tokenizer.updateOptions(options)" in engines
    assert "PromptIds.withLeadingBos(" in engines

    demo = _code(IOS / "MobileLLMDemo" / "DemoModel.swift")
    assert re.search(r"^import Tokenizers$", demo, re.M)
    assert "AutoTokenizer.from(modelFolder: dir)" in demo
    assert "withLeadingBos(" in demo
    et = _code(IOS / "MobileLLMDemo" / "ExecuTorchRunner.swift")
    assert "TextRunner(" in et and "tokenizerPath: bundleDir.appendingPathComponent(manifest.tokenizer).path" in et
    assert "$0.bosCount = 1" in et


def test_manifests_read_with_maintained_json_libraries() -> None:
    """org.json (built into Android) and Foundation's JSONDecoder with Codable, not a hand-written parser."""
    assert not (CORE_KT / "Json.kt").exists()
    manifest_kt = _code(CORE_KT / "Manifest.kt")
    assert "import org.json.JSONObject" in manifest_kt and "JSONObject(text)" in manifest_kt
    assert "JSONObject(json)" in _code(CORE_KT / "Generation.kt")  # the runner's stats JSON too
    hand_parser = re.compile(
        r"\b(?:class|object|struct|enum)\s+\w*(?:Json|JSON)\w*|\bJsonException\b|\bJSONSerialization\b"
    )
    offenders = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
        for p in app_sources()
        for n, line in enumerate(_code(p).splitlines(), 1)
        if hand_parser.search(line)
    ]
    assert not offenders, "JSON handled outside org.json / JSONDecoder:\n" + "\n".join(offenders)
    swift = _code(IOS / "MobileLLMDemo" / "BundleManifest.swift")
    assert "JSONDecoder().decode(BundleManifest.self, from: Data(contentsOf: url))" in swift
    for struct in ("BundleManifest", "ModelInfo", "IOSpec", "TensorSpec", "FileEntry", "ParitySummary"):
        assert re.search(rf"struct {struct}: (?:\w+, )*Codable\b", swift), f"{struct} is not Codable"


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


PROSE = "And God said, Let there be light: and there was light."


@pytest.mark.xdist_group("default_bundles")
def test_runtime_tokenizers_give_the_export_prompt_ids(default_bundles: dict[str, Path]) -> None:
    """The apps' tokenizer settings, on the runtimes' own tokenizers (the C++ cores the phone libraries wrap):
    ExecuTorch's TextLLMRunner (LlmModule / TextRunner) with the file manifest `tokenizer` names and one BOS,
    and onnxruntime-genai's Tokenizer with add_special_tokens, give the ids the export's parity check feeds:
    BOS + text, as the bundle's tokenizer.json encodes."""
    from tokenizers import Tokenizer

    from mobilellm.exporter.targets.executorch import generate_with_runner

    et = default_bundles["executorch"]
    manifest = json.loads((et / "manifest.json").read_text())
    expected = Tokenizer.from_file(str(et / "tokenizer.json")).encode(PROSE).ids
    assert expected[0] == manifest["bos_id"] and expected[1] != manifest["bos_id"]
    counts = {}
    for num_bos in (1, 0):
        stats: list[Any] = []
        generate_with_runner(et, et / manifest["tokenizer"], PROSE, 2, 0.0, bool(num_bos), None, stats.append)
        counts[num_bos] = stats[-1].num_prompt_tokens
    # numBos / bosCount = 1 is what the apps pass; the runner's default (0) would drop BOS.
    assert counts == {1: len(expected), 0: len(expected) - 1}, (counts, len(expected))

    import onnxruntime_genai as og

    onnx = default_bundles["onnx"]
    tok = og.Tokenizer(og.Model(str(onnx)))
    assert [int(i) for i in tok.encode(PROSE)] == expected[1:]  # genai's default: no special tokens
    tok.update_options(add_special_tokens="true")  # what the Android app sets (Tokenizer.updateOptions)
    assert [int(i) for i in tok.encode(PROSE)] == expected


# ------------------------------------------------------------------------------------------ tests: Kotlin
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


def org_json_jar() -> str:
    """A jar with org.json (what Android has built in): Debian's libandroid-json-java first."""
    import zipfile

    for cand in ORG_JSON_JARS:
        if Path(cand).is_file() and "org/json/JSONObject.class" in zipfile.ZipFile(cand).namelist():
            return cand
    raise AssertionError(
        "no org.json jar: the Android demo's Kotlin reads manifests with org.json (built into Android). "
        "Install Debian's `libandroid-json-java` (Android's own org.json: /usr/share/java/com.android.json.jar) "
        "with `apt-get install -y libandroid-json-java` (make setup does). Debian's libjson-java is json-lib "
        "(net.sf.json), not org.json."
    )


BUNDLE_LINE = re.compile(r"^BUNDLE (.*)$", re.M)


@pytest.mark.xdist_group("default_bundles")
def test_android_kotlin_compiles_and_core_tests_pass(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """One kotlinc run over the whole app: the platform-free core against org.json, the Android UI/engine
    code type-checked against API stubs (android_demo/core-tests/stubs: the android.*, ExecuTorch AAR and
    onnxruntime-genai AAR signatures the app calls), and the main-based test runner, which then runs on the
    JVM, on the exported ExecuTorch and ONNX bundles too when the export works (when it does not,
    test_manifest_keys_exist_in_real_bundle fails and says why)."""
    kotlinc = shutil.which("kotlinc")
    assert kotlinc, (
        "kotlinc is not on PATH: the Android demo's Kotlin cannot be compiled and tested. "
        "Install it with `apt-get install -y kotlin` (Debian's Kotlin 1.3.31 works with JDK 17)."
    )
    javac, java = shutil.which("javac"), shutil.which("java")
    assert javac and java, "a JDK (javac, java) is needed next to kotlinc: `apt-get install -y default-jdk-headless`"
    json_jar = org_json_jar()
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
        [kotlinc, "-cp", os.pathsep.join([str(stubs), json_jar]), *sources, "-d", str(jar)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    compile_s = time.time() - t0
    errors = [
        line for line in (proc.stdout + proc.stderr).splitlines() if ": error:" in line or line.startswith("error:")
    ]
    assert proc.returncode == 0 and jar.is_file(), f"kotlinc failed ({compile_s:.0f}s):\n" + "\n".join(
        errors or [proc.stderr[-4000:]]
    )
    print(f"kotlinc compiled {len(sources)} files in {compile_s:.1f}s")

    try:
        bundles = {t: request.getfixturevalue("default_bundles")[t] for t in APP_TARGETS["android"]}
    except pytest.fail.Exception:
        bundles = {}
    bundle_args = [arg for path in bundles.values() for arg in ("--bundle", str(path))]
    run = subprocess.run(
        [
            java,
            "-cp",
            os.pathsep.join([str(jar), kotlin_classpath_stdlib(), json_jar]),
            "org.mobilellm.demo.core.tests.CoreTestsKt",
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
    assert m and int(m.group(1)) >= (15 if len(bundles) == 2 else 10), f"unexpected summary: {last!r}"
    # What the app read through org.json equals what Python's json reads from the same manifests.
    seen = [dict(kv.split("=", 1) for kv in line.split()) for line in BUNDLE_LINE.findall(run.stdout)]
    assert len(seen) == len(bundles), seen
    for target, path in bundles.items():
        manifest = json.loads((path / "manifest.json").read_text())
        got = next(s for s in seen if s["target"] == target)
        assert got["tokenizer"] == manifest["tokenizer"]
        assert int(got["bos"]) == manifest["bos_id"]
        assert [int(e) for e in got["eos"].split(",")] == manifest["eos_ids"]
        assert int(got["max_context"]) == manifest["max_context"]
        assert int(got["vocab"]) == manifest["vocab_size"]
