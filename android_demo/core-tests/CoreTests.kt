package org.mobilellm.demo.core.tests

import org.json.JSONArray
import org.json.JSONObject
import org.mobilellm.demo.core.BundleValidator
import org.mobilellm.demo.core.Manifest
import org.mobilellm.demo.core.ManifestException
import org.mobilellm.demo.core.PromptBudget
import org.mobilellm.demo.core.PromptIds
import org.mobilellm.demo.core.RunnerStats
import org.mobilellm.demo.core.StopReason
import org.mobilellm.demo.core.StopRule
import org.mobilellm.demo.core.Throughput
import java.io.File

// A tiny main-based test runner for the platform-free Kotlin of the Android demo (no JUnit: the
// test machine cannot download Maven artifacts). org.json comes from Debian's libandroid-json-java
// (Android's own org.json, from AOSP libcore). Run by tests/test_demo_apps.py:
//   kotlinc -cp <json.jar> app/src/main/java/org/mobilellm/demo/core/*.kt core-tests/CoreTests.kt -d core.jar
//   java -cp core.jar:<kotlin-stdlib>:<json.jar> org.mobilellm.demo.core.tests.CoreTestsKt [--bundle BUNDLE_DIR]...
// Prints one line per test and "N passed, N failed" last; exits 1 if anything failed. For each
// bundle it also prints one "BUNDLE key=value ..." line with what the app read from its manifest.

private var passed = 0
private var failed = 0

private fun test(name: String, body: () -> Unit) {
    try {
        body()
        passed++
        println("PASS $name")
    } catch (t: Throwable) {
        failed++
        println("FAIL $name: $t")
    }
}

private fun check(cond: Boolean, msg: () -> String) { if (!cond) throw AssertionError(msg()) }

private fun <T> eq(actual: T, expected: T, what: String = "") {
    if (actual != expected) throw AssertionError("$what expected <$expected> but was <$actual>")
}

private inline fun <reified E : Throwable> throws(body: () -> Unit): E {
    try { body() } catch (e: Throwable) { if (e is E) return e; throw AssertionError("expected ${E::class.java.simpleName}, got $e") }
    throw AssertionError("expected ${E::class.java.simpleName}, nothing was thrown")
}

private fun manifestJson(target: String = "executorch", files: String, parity: String = "{\"passed\": true, \"report\": \"parity.json\", \"top1_vs_reference\": 1.0, \"top1_vs_twin\": 1.0, \"ppl_delta_vs_reference\": 0.0, \"failures\": []}") = """
{"schema_version": 1, "name": "t-$target-4bit", "target": "$target", "artifact": "model.pte", "artifacts": ["model.pte"],
 "tokenizer": "tokenizer.model", "bits": 4, "embedding_bits": 8, "group_size": 32, "max_context": 16, "vocab_size": 10,
 "bos_id": 1, "eos_ids": [2], "model": {"dim": 8, "n_layers": 2, "n_applied": 4, "n_heads": 2, "n_kv_heads": 1, "head_dim": 4,
 "ffn_dim": 16, "vocab_size": 10, "layer_sharing": "immediate", "share_embedding": true, "rope_theta": 10000.0, "norm_eps": 1e-5,
 "unique_params": 123},
 "io": {"inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "1..15"]}, {"name": "input_pos", "dtype": "int64", "shape": [1]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "seq_len", 10]}]},
 "files": $files, "parity": $parity}
"""

private val TARGETS = listOf("executorch", "onnx")

private fun unitTests() {
    test("manifest: org.json reads every key the app uses") {
        val m = Manifest.parse(manifestJson(files = "{}"))
        eq(m.schemaVersion, 1); eq(m.target, "executorch"); eq(m.artifact, "model.pte"); eq(m.tokenizer, "tokenizer.model")
        eq(m.maxContext, 16); eq(m.vocabSize, 10); eq(m.bosId, 1); eq(m.eosIds, listOf(2)); eq(m.bits, 4)
        eq(m.modelVocabSize, 10); eq(m.modelApplied, 4); eq(m.layerSharing, "immediate")
        eq(m.inputs.map { it.name }, listOf("tokens", "input_pos")); eq(m.inputs[0].dtype, "int64")
        eq(m.outputs[0].shape, listOf<Any?>(1L, "seq_len", 10L))
        eq(m.tensors("io.states").size, 0)
        eq(m.parityPassed, true)
        eq(m.double("model.rope_theta"), 10000.0)
        eq(m.bool("model.share_embedding"), true)
        eq(m.stringList("artifacts"), listOf("model.pte"))
        eq(m.long("model.unique_params"), 123L)
        eq(Manifest.parse(manifestJson(files = "{}", parity = "null")).parityPassed, null)
    }
    test("manifest: JSON escapes and 64-bit integers come through org.json") {
        val m = Manifest.parse("{\"name\": \"x\\n\\u00e9\\\"\\u4e2d\", \"big\": 12345678901234, \"files\": {\"b\": {\"sha256\": \"00\", \"bytes\": 5000000000}, \"a\": {\"sha256\": \"11\", \"bytes\": 1}}}")
        eq(m.name, "x\né\"中")
        eq(m.long("big"), 12345678901234L)
        check(throws<ManifestException> { m.int("big") }.message!!.contains("32-bit")) { "int range" }
        eq(m.files.keys.toList(), listOf("b", "a"), "files order")
        eq(m.files["b"]!!.bytes, 5000000000L)
    }
    test("manifest: missing or mistyped keys name the key") {
        val m = Manifest.parse("{\"schema_version\": 1, \"max_context\": \"512\", \"vocab_size\": 3.5, \"eos_ids\": [2, \"x\"], \"parity\": null}")
        check(throws<ManifestException> { m.artifact }.message!!.contains("'artifact'")) { "key not named" }
        check(throws<ManifestException> { m.maxContext }.message!!.contains("'max_context'")) { "key not named" }
        check(throws<ManifestException> { m.vocabSize }.message!!.contains("'vocab_size' must be an integer")) { "decimal accepted as int" }
        check(throws<ManifestException> { m.eosIds }.message!!.contains("'eos_ids'")) { "list item type" }
        eq(m.parityPassed, null)
        check(throws<ManifestException> { m.string("parity.report") }.message!!.contains("parity.report")) { "null parent" }
    }
    test("manifest: text that is not a JSON object is refused") {
        for (bad in listOf("", "{", "[1]", "{\"a\" 1}", "\"abc", "42")) {
            val e = throws<ManifestException> { Manifest.parse(bad) }
            check(e.message!!.startsWith("manifest.json is not a JSON object")) { "'$bad': ${e.message}" }
        }
    }
    test("bundle validation: sizes, hashes, targets, every listed file, ids") {
        val dir = java.nio.file.Files.createTempDirectory("bundle").toFile()
        try {
            File(dir, "model.pte").writeBytes(ByteArray(100) { it.toByte() })
            File(dir, "tokenizer.model").writeBytes(ByteArray(7))
            File(dir, "tokenizer.json").writeText("{}")
            val pteSha = BundleValidator.sha256(File(dir, "model.pte"))
            val tokSha = BundleValidator.sha256(File(dir, "tokenizer.model"))
            val jsonSha = BundleValidator.sha256(File(dir, "tokenizer.json"))
            // sha256 of 7 zero bytes, as `sha256sum` prints it
            eq(tokSha, "837885c8f8091aeaeb9ec3c3f85a6ff470a415e610b8ba3e49f9b33c9cf9d619")
            val good = "{\"model.pte\": {\"sha256\": \"$pteSha\", \"bytes\": 100}, \"tokenizer.model\": {\"sha256\": \"$tokSha\", \"bytes\": 7}, " +
                "\"tokenizer.json\": {\"sha256\": \"$jsonSha\", \"bytes\": 2}}"
            val ok = BundleValidator.validate(dir, Manifest.parse(manifestJson(files = good)), TARGETS, checkHashes = true)
            check(ok.ok) { "errors: ${ok.errors}" }
            eq(ok.warnings.size, 0)
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(target = "onnx", files = good)), TARGETS).ok) { "onnx target" }
            val wrongTarget = BundleValidator.validate(dir, Manifest.parse(manifestJson(target = "coreml", files = good)), TARGETS)
            check(wrongTarget.errors.any { it.contains("--target executorch or --target onnx") }) { "${wrongTarget.errors}" }
            val badSize = good.replace("\"bytes\": 100", "\"bytes\": 99")
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = badSize)), TARGETS).errors.any { it.contains("99") }) { "size" }
            val badSha = good.replace(pteSha, "0".repeat(64))
            check(!BundleValidator.validate(dir, Manifest.parse(manifestJson(files = badSha)), TARGETS, checkHashes = true).ok) { "sha" }
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = badSha)), TARGETS, checkHashes = false).ok) { "sha skipped" }
            val badJsonSha = good.replace(jsonSha, "0".repeat(64))
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = badJsonSha)), TARGETS, checkHashes = true).errors
                .any { it.contains("tokenizer.json sha256") }) { "sha of a file beside artifact and tokenizer" }
            val failedParity = BundleValidator.validate(dir, Manifest.parse(manifestJson(files = good, parity = "{\"passed\": false}")), TARGETS)
            check(failedParity.ok && failedParity.warnings.any { it.contains("FAILED") }) { "parity warning" }
            File(dir, "tokenizer.json").delete()
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = good)), TARGETS).errors.any { it.contains("tokenizer.json is missing") }) {
                "a listed file the runtime reads (tokenizer.json) is missing"
            }
            File(dir, "tokenizer.model").delete()
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = good)), TARGETS).errors.any { it.contains("tokenizer.model is missing") }) { "missing" }
            val badIds = manifestJson(files = good).replace("\"bos_id\": 1", "\"bos_id\": 10")
            check(BundleValidator.validate(dir, Manifest.parse(badIds), TARGETS).errors.any { it.contains("bos_id 10") }) { "ids" }
            val unsafe = "{\"../x\": {\"sha256\": \"00\", \"bytes\": 1}}"
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = unsafe)), TARGETS).errors.any { it.contains("unsafe path '../x'") }) { "unsafe" }
        } finally {
            dir.deleteRecursively()
        }
    }
    test("prompt ids: exactly one leading BOS whether or not the tokenizer added it") {
        eq(PromptIds.withLeadingBos(intArrayOf(1, 5, 6), 1).toList(), listOf(1, 5, 6))
        eq(PromptIds.withLeadingBos(intArrayOf(5, 6), 1).toList(), listOf(1, 5, 6))
        eq(PromptIds.withLeadingBos(intArrayOf(), 1).toList(), listOf(1))
        eq(PromptIds.withLeadingBos(intArrayOf(5, 1), 1).toList(), listOf(1, 5, 1))
    }
    test("stop rule: eos ids, context full, token budget") {
        val r = StopRule(listOf(2, 7), maxContext = 10, maxNewTokens = 5)
        eq(r.check(7, promptTokens = 3, generated = 1), StopReason.EOS)
        eq(r.check(4, promptTokens = 3, generated = 1), null)
        eq(r.check(4, promptTokens = 3, generated = 5), StopReason.MAX_NEW_TOKENS)
        eq(r.check(4, promptTokens = 8, generated = 1), null)
        eq(r.check(4, promptTokens = 8, generated = 2), StopReason.CONTEXT_FULL)
    }
    test("prompt budget: prompt must fit max_context; new tokens capped") {
        val b = PromptBudget(512)
        eq(b.problem(511), null)
        check(b.problem(512)!!.contains("512")) { "message" }
        check(b.problem(0) != null) { "empty" }
        eq(b.newTokens(10, 100), 100)
        eq(b.newTokens(500, 100), 12)
        eq(b.newTokens(600, 5), 0)
    }
    test("throughput: prefill, decode and overall tokens/s") {
        val t = Throughput()
        t.start(0L, promptTokens = 20)
        t.token(500_000_000L)                  // first token after 0.5 s: prefill 40 tok/s
        for (k in 1..10) t.token(500_000_000L + k * 100_000_000L) // 10 more in 1 s
        check(Math.abs(t.prefillTokensPerSecond() - 40.0) < 1e-9) { "${t.prefillTokensPerSecond()}" }
        check(Math.abs(t.decodeTokensPerSecond() - 10.0) < 1e-9) { "${t.decodeTokensPerSecond()}" }
        check(Math.abs(t.overallTokensPerSecond() - 11.0 / 1.5) < 1e-9) { "${t.overallTokensPerSecond()}" }
        eq(Throughput.format(12.345), "12.3 tok/s")
        eq(Throughput().decodeTokensPerSecond(), 0.0)
    }
    test("runner stats: ExecuTorch onStats JSON through org.json") {
        val s = RunnerStats.parse("{\"prompt_tokens\":10,\"generated_tokens\":50,\"model_load_start_ms\":1000,\"model_load_end_ms\":1250," +
            "\"inference_start_ms\":2000,\"prompt_eval_end_ms\":2100,\"first_token_ms\":2100,\"inference_end_ms\":4600," +
            "\"aggregate_sampling_time_ms\":30,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}")
        eq(s.promptTokens, 10L); eq(s.generatedTokens, 50L)
        check(Math.abs(s.prefillTokensPerSecond - 100.0) < 1e-9) { "${s.prefillTokensPerSecond}" }
        check(Math.abs(s.decodeTokensPerSecond - 20.0) < 1e-9) { "${s.decodeTokensPerSecond}" }
        check(Math.abs(s.modelLoadMs - 250.0) < 1e-9) { "${s.modelLoadMs}" }
        throws<org.json.JSONException> { RunnerStats.parse("not json") }
    }
}

/** The id the bundle's tokenizer.json BOS template puts first (what genai with add_special_tokens and
 *  swift-transformers apply), or null when it has no template that starts with a special token. */
private fun templateBos(tokenizerJson: JSONObject): Int? {
    val pp = tokenizerJson.optJSONObject("post_processor") ?: return null
    val candidates = ArrayList<JSONObject>()
    candidates.add(pp)
    val nested: JSONArray? = pp.optJSONArray("processors")
    if (nested != null) for (k in 0 until nested.length()) candidates.add(nested.getJSONObject(k))
    for (p in candidates) {
        if (p.optString("type") != "TemplateProcessing") continue
        val first = p.getJSONArray("single").getJSONObject(0).optJSONObject("SpecialToken") ?: continue
        return p.getJSONObject("special_tokens").getJSONObject(first.getString("id")).getJSONArray("ids").getInt(0)
    }
    return null
}

private fun bundleTests(dirPath: String) {
    val dir = File(dirPath)
    val m = Manifest.load(dir)
    test("real ${m.target} bundle: manifest parses and validates (sizes + sha256 of every file)") {
        val r = BundleValidator.validate(dir, m, TARGETS, checkHashes = true)
        check(r.ok) { "errors: ${r.errors}" }
        check(m.target in TARGETS) { m.target }
        check(File(dir, m.tokenizer).isFile) { "tokenizer ${m.tokenizer} missing" }
        println("BUNDLE target=${m.target} tokenizer=${m.tokenizer} bos=${m.bosId} eos=${m.eosIds.joinToString(",")} " +
            "max_context=${m.maxContext} vocab=${m.vocabSize} parity=${m.parityPassed} warnings=${r.warnings.size}")
    }
    test("real ${m.target} bundle: the tokenizer.json the runtimes read puts manifest bos_id first") {
        // Every bundle carries tokenizer.json + tokenizer_config.json (listed in files) beside the original file.
        check(m.files.containsKey("tokenizer.json") && m.files.containsKey("tokenizer_config.json")) { "files: ${m.files.keys}" }
        val tok = JSONObject(File(dir, "tokenizer.json").readText())
        eq(templateBos(tok), m.bosId, "BOS template of tokenizer.json")
        val added = tok.getJSONArray("added_tokens")
        val ids = (0 until added.length()).map { added.getJSONObject(it).getInt("id") }
        check(ids.contains(m.bosId)) { "bos_id ${m.bosId} is not a special token of tokenizer.json ($ids)" }
        check(m.eosIds.all { ids.contains(it) }) { "eos_ids ${m.eosIds} are not all special tokens of tokenizer.json ($ids)" }
        val config = JSONObject(File(dir, "tokenizer_config.json").readText())
        eq(config.optBoolean("add_bos_token", false), true, "tokenizer_config.json add_bos_token")
    }
    if (m.target == "onnx") {
        test("real onnx bundle: genai_config.json (what onnxruntime-genai reads) agrees with the manifest") {
            check(m.files.containsKey("genai_config.json")) { "no genai_config.json in files ${m.files.keys}" }
            val model = JSONObject(File(dir, "genai_config.json").readText()).getJSONObject("model")
            eq(model.getInt("bos_token_id"), m.bosId, "bos_token_id")
            val eos = model.get("eos_token_id")
            val eosIds = if (eos is JSONArray) (0 until eos.length()).map { eos.getInt(it) } else listOf((eos as Number).toInt())
            eq(eosIds, m.eosIds, "eos_token_id")
            eq(model.getInt("context_length"), m.maxContext, "context_length")
            eq(model.getInt("vocab_size"), m.vocabSize, "vocab_size")
        }
    }
}

fun main(args: Array<String>) {
    unitTests()
    var k = 0
    while (k < args.size) {
        if (args[k] == "--bundle" && k + 1 < args.size) { bundleTests(args[k + 1]); k += 2 } else throw IllegalArgumentException("unknown argument ${args[k]}")
    }
    println("$passed passed, $failed failed")
    if (failed > 0) System.exit(1)
}
