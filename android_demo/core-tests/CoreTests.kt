package org.mobilellm.demo.core.tests

import org.mobilellm.demo.core.BundleValidator
import org.mobilellm.demo.core.Json
import org.mobilellm.demo.core.JsonException
import org.mobilellm.demo.core.Manifest
import org.mobilellm.demo.core.ManifestException
import org.mobilellm.demo.core.PromptBudget
import org.mobilellm.demo.core.RunnerStats
import org.mobilellm.demo.core.Sampler
import org.mobilellm.demo.core.SentencePieceTokenizer
import org.mobilellm.demo.core.StopReason
import org.mobilellm.demo.core.StopRule
import org.mobilellm.demo.core.StreamingDecoder
import org.mobilellm.demo.core.Throughput
import java.io.File

// A tiny main-based test runner for the platform-free Kotlin of the Android demo (no JUnit: the
// test machine cannot download Maven artifacts). Run by tests/test_demo_apps.py:
//   kotlinc app/src/main/java/org/mobilellm/demo/core/*.kt core-tests/CoreTests.kt -d core.jar
//   java -cp core.jar:<kotlin-stdlib> org.mobilellm.demo.core.tests.CoreTestsKt \
//        [--tokenizer tokenizer.model --cases cases.json] [--bundle BUNDLE_DIR]
// Prints one line per test and "N passed, N failed" last; exits 1 if anything failed.

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

private fun unitTests() {
    test("json: values, nesting, escapes, numbers") {
        @Suppress("UNCHECKED_CAST")
        val v = Json.parse(" {\"a\": [1, -2, 3.5, 1e3, true, false, null], \"s\": \"x\\n\\u00e9\\\"\\u2581\", \"o\": {}} ") as Map<String, Any?>
        eq(v["a"], listOf<Any?>(1L, -2L, 3.5, 1000.0, true, false, null))
        eq(v["s"], "x\né\"\u2581")
        eq(v["o"], emptyMap<String, Any?>())
        eq(Json.parse("12345678901234"), 12345678901234L)
    }
    test("json: malformed input is rejected with an offset") {
        for (bad in listOf("", "{", "[1,]", "{\"a\" 1}", "01", "\"abc", "tru", "{} x", "1.", "\"\\q\"")) {
            val e = throws<JsonException> { Json.parse(bad) }
            check(e.message!!.contains("offset")) { "no offset in '${e.message}'" }
        }
    }
    test("manifest: accessors read every key the app uses") {
        val m = Manifest.parse(manifestJson(files = "{}"))
        eq(m.schemaVersion, 1); eq(m.target, "executorch"); eq(m.artifact, "model.pte"); eq(m.tokenizer, "tokenizer.model")
        eq(m.maxContext, 16); eq(m.vocabSize, 10); eq(m.bosId, 1); eq(m.eosIds, listOf(2)); eq(m.bits, 4)
        eq(m.modelVocabSize, 10); eq(m.modelApplied, 4); eq(m.layerSharing, "immediate")
        eq(m.inputs.map { it.name }, listOf("tokens", "input_pos")); eq(m.inputs[0].dtype, "int64")
        eq(m.outputs[0].shape, listOf<Any?>(1L, "seq_len", 10L))
        eq(m.tensors("io.states").size, 0)
        eq(m.parityPassed, true)
        eq(Manifest.parse(manifestJson(files = "{}", parity = "null")).parityPassed, null)
    }
    test("manifest: missing or mistyped keys name the key") {
        val m = Manifest.parse("{\"schema_version\": 1, \"max_context\": \"512\"}")
        check(throws<ManifestException> { m.artifact }.message!!.contains("'artifact'")) { "key not named" }
        check(throws<ManifestException> { m.maxContext }.message!!.contains("'max_context'")) { "key not named" }
        throws<ManifestException> { Manifest.parse("[1]") }
        throws<ManifestException> { Manifest.parse("{") }
    }
    test("bundle validation: sizes, hashes, target, missing files, ids") {
        val dir = java.nio.file.Files.createTempDirectory("bundle").toFile()
        try {
            File(dir, "model.pte").writeBytes(ByteArray(100) { it.toByte() })
            File(dir, "tokenizer.model").writeBytes(ByteArray(7))
            val pteSha = BundleValidator.sha256(File(dir, "model.pte"))
            val tokSha = BundleValidator.sha256(File(dir, "tokenizer.model"))
            // sha256 of 7 zero bytes, as `sha256sum` prints it
            eq(tokSha, "837885c8f8091aeaeb9ec3c3f85a6ff470a415e610b8ba3e49f9b33c9cf9d619")
            val good = "{\"model.pte\": {\"sha256\": \"$pteSha\", \"bytes\": 100}, \"tokenizer.model\": {\"sha256\": \"$tokSha\", \"bytes\": 7}}"
            val ok = BundleValidator.validate(dir, Manifest.parse(manifestJson(files = good)), "executorch", checkHashes = true)
            check(ok.ok) { "errors: ${ok.errors}" }
            eq(ok.warnings.size, 0)
            val wrongTarget = BundleValidator.validate(dir, Manifest.parse(manifestJson(target = "coreml", files = good)), "executorch")
            check(wrongTarget.errors.any { it.contains("--target executorch") }) { "${wrongTarget.errors}" }
            val badSize = good.replace("\"bytes\": 100", "\"bytes\": 99")
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = badSize)), "executorch").errors.any { it.contains("99") }) { "size" }
            val badSha = good.replace(pteSha, "0".repeat(64))
            check(!BundleValidator.validate(dir, Manifest.parse(manifestJson(files = badSha)), "executorch", checkHashes = true).ok) { "sha" }
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = badSha)), "executorch", checkHashes = false).ok) { "sha skipped" }
            val failedParity = BundleValidator.validate(dir, Manifest.parse(manifestJson(files = good, parity = "{\"passed\": false}")), "executorch")
            check(failedParity.ok && failedParity.warnings.any { it.contains("FAILED") }) { "parity warning" }
            File(dir, "tokenizer.model").delete()
            check(BundleValidator.validate(dir, Manifest.parse(manifestJson(files = good)), "executorch").errors.any { it.contains("tokenizer.model is missing") }) { "missing" }
            val badIds = manifestJson(files = good).replace("\"bos_id\": 1", "\"bos_id\": 10")
            check(BundleValidator.validate(dir, Manifest.parse(badIds), "executorch").errors.any { it.contains("bos_id 10") }) { "ids" }
        } finally {
            dir.deleteRecursively()
        }
    }
    test("sampler: greedy argmax, ties to lowest id, rows at an offset") {
        eq(Sampler.argmax(floatArrayOf(0f, 3f, 3f, -1f)), 1)
        eq(Sampler(0f).sample(floatArrayOf(9f, 9f, 0f, 1f, 5f, 2f), offset = 3, vocab = 3), 1)
        eq(Sampler(0.8f, topK = 1, seed = 3).sample(floatArrayOf(0f, 1f, 7f, 2f)), 2)
    }
    test("sampler: temperature sampling follows softmax(logits / T)") {
        val s = Sampler(1.0f, seed = 42)
        val logits = floatArrayOf(0f, Math.log(3.0).toFloat())
        var ones = 0
        val n = 20000
        for (k in 0 until n) if (s.sample(logits) == 1) ones++
        val frac = ones.toDouble() / n
        check(Math.abs(frac - 0.75) < 0.02) { "P(1) = $frac, expected 0.75" }
        val cold = Sampler(0.05f, seed = 1)
        for (k in 0 until 100) eq(cold.sample(floatArrayOf(1f, 2f, 1.5f)), 1)
    }
    test("stop rule: eos ids, context full, token budget") {
        val r = StopRule(listOf(2, 7), maxContext = 10, maxNewTokens = 5)
        eq(r.check(7, promptTokens = 3, generated = 1), StopReason.EOS)
        eq(r.check(4, promptTokens = 3, generated = 1), null)
        eq(r.check(4, promptTokens = 3, generated = 5), StopReason.MAX_NEW_TOKENS)
        eq(r.check(4, promptTokens = 8, generated = 1), null)
        eq(r.check(4, promptTokens = 8, generated = 2), StopReason.CONTEXT_FULL)
    }
    test("prompt budget: prompt must fit max_context; seqLen capped") {
        val b = PromptBudget(512)
        eq(b.problem(511), null)
        check(b.problem(512)!!.contains("512")) { "message" }
        check(b.problem(0) != null) { "empty" }
        eq(b.seqLen(10, 100), 110)
        eq(b.seqLen(500, 100), 512)
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
    test("runner stats: ExecuTorch onStats JSON") {
        val s = RunnerStats.parse("{\"prompt_tokens\":10,\"generated_tokens\":50,\"model_load_start_ms\":1000,\"model_load_end_ms\":1250," +
            "\"inference_start_ms\":2000,\"prompt_eval_end_ms\":2100,\"first_token_ms\":2100,\"inference_end_ms\":4600," +
            "\"aggregate_sampling_time_ms\":30,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}")
        eq(s.promptTokens, 10L); eq(s.generatedTokens, 50L)
        check(Math.abs(s.prefillTokensPerSecond - 100.0) < 1e-9) { "${s.prefillTokensPerSecond}" }
        check(Math.abs(s.decodeTokensPerSecond - 20.0) < 1e-9) { "${s.decodeTokensPerSecond}" }
        check(Math.abs(s.modelLoadMs - 250.0) < 1e-9) { "${s.modelLoadMs}" }
    }
}

private fun tokenizerTests(tokPath: String, casesPath: String) {
    val tok = SentencePieceTokenizer.load(File(tokPath))
    @Suppress("UNCHECKED_CAST")
    val cases = Json.parse(File(casesPath).readText()) as List<Map<String, Any?>>
    test("tokenizer: encode matches sentencepiece on ${cases.size} texts") {
        val bad = ArrayList<String>()
        for (c in cases) {
            val text = c["text"] as String
            val want = (c["ids"] as List<*>).map { (it as Long).toInt() }
            val got = tok.encode(text).toList()
            if (got != want) bad.add("'${text.take(60)}': got ${got.take(20)} want ${want.take(20)}")
        }
        check(bad.isEmpty()) { "${bad.size} mismatches, first: ${bad.take(3)}" }
    }
    test("tokenizer: decode matches sentencepiece") {
        val bad = ArrayList<String>()
        for (c in cases) {
            val ids = (c["ids"] as List<*>).map { (it as Long).toInt() }.toIntArray()
            val want = c["decoded"] as String
            val got = tok.decode(ids)
            if (got != want) bad.add("got '${got.take(60)}' want '${want.take(60)}'")
        }
        check(bad.isEmpty()) { "${bad.size} mismatches, first: ${bad.take(3)}" }
    }
    test("tokenizer: streaming decode equals full decode, never shows partial UTF-8") {
        for (c in cases) {
            val ids = (c["ids"] as List<*>).map { (it as Long).toInt() }
            val d = StreamingDecoder(tok, startOfText = true)
            val sb = StringBuilder()
            for (id in ids) {
                val delta = d.push(id)
                check(!delta.contains('\uFFFD') || (c["decoded"] as String).contains('\uFFFD')) { "partial UTF-8 shown for '${c["text"]}'" }
                sb.append(delta)
            }
            eq(sb.toString(), c["decoded"] as String, "stream of '${(c["text"] as String).take(40)}'")
        }
    }
    test("tokenizer: BOS/EOS ids and control pieces") {
        eq(tok.encode("hello", addBos = true)[0], tok.bosId)
        eq(tok.decode(intArrayOf(tok.bosId, tok.eosId)), "")
    }
}

private fun bundleTests(dirPath: String) {
    val dir = File(dirPath)
    test("real bundle: manifest parses and validates (sizes + sha256) as an executorch bundle") {
        val m = Manifest.load(dir)
        val r = BundleValidator.validate(dir, m, m.target, checkHashes = true)
        check(r.ok) { "errors: ${r.errors}" }
        eq(m.target, "executorch")
        println("  bundle ${m.name}: ${m.artifact}, ${m.tokenizer}, max_context ${m.maxContext}, vocab ${m.vocabSize}, bos ${m.bosId}, eos ${m.eosIds}, parity ${m.parityPassed}, warnings ${r.warnings}")
    }
    test("real bundle: tokenizer named by the manifest agrees with manifest ids") {
        val m = Manifest.load(dir)
        val tok = SentencePieceTokenizer.load(File(dir, m.tokenizer))
        eq(tok.vocabSize, m.vocabSize, "vocab")
        eq(tok.bosId, m.bosId, "bos")
        check(m.eosIds.contains(tok.eosId)) { "eos ${tok.eosId} not in ${m.eosIds}" }
        val ids = tok.encode("And God said, Let there be light", addBos = true)
        check(PromptBudget(m.maxContext).problem(ids.size) == null) { "short prompt rejected" }
    }
}

fun main(args: Array<String>) {
    fun arg(name: String): String? { val k = args.indexOf(name); return if (k >= 0 && k + 1 < args.size) args[k + 1] else null }
    unitTests()
    val tokPath = arg("--tokenizer")
    val casesPath = arg("--cases")
    if (tokPath != null && casesPath != null) tokenizerTests(tokPath, casesPath)
    val bundle = arg("--bundle")
    if (bundle != null) bundleTests(bundle)
    println("$passed passed, $failed failed")
    if (failed > 0) System.exit(1)
}
