package org.mobilellm.demo.core

import org.json.JSONObject

// Platform-free (no android.* imports): stop tokens, context budget, the BOS rule, tokens/s and
// ExecuTorch's stats JSON. Tokenizing and sampling happen in the runtimes (ExecuTorch's LlmModule,
// onnxruntime-genai's Generator), not here. The Swift app (ios_demo/MobileLLMDemo/Generation.swift)
// follows the same rules.

enum class StopReason(val label: String) {
    EOS("end of sequence"), CONTEXT_FULL("context full (max_context)"), MAX_NEW_TOKENS("max new tokens"), USER("stopped")
}

/** When to stop: an id from manifest eos_ids, the KV cache (max_context) full, or the token budget. */
class StopRule(eosIds: List<Int>, val maxContext: Int, val maxNewTokens: Int) {
    private val eos: Set<Int> = eosIds.toSet()

    fun isEos(token: Int): Boolean = token in eos

    /**
     * `token` was just sampled; `generated` tokens (including it) exist after a prompt of
     * `promptTokens`. Returns why to stop, or null to feed `token` and go on.
     */
    fun check(token: Int, promptTokens: Int, generated: Int): StopReason? {
        if (token in eos) return StopReason.EOS
        if (generated >= maxNewTokens) return StopReason.MAX_NEW_TOKENS
        // Feeding `token` writes KV position promptTokens + generated - 1, which must be < maxContext.
        if (promptTokens + generated > maxContext - 1) return StopReason.CONTEXT_FULL
        return null
    }
}

/** Checks a prompt against manifest max_context before running anything. */
class PromptBudget(val maxContext: Int) {
    /** Longest prefill the exported model accepts: tokens [1, S] with S <= max_context - 1. */
    val maxPromptTokens: Int get() = maxContext - 1

    /** null if a prompt of `promptTokens` (BOS included) fits, else a message saying what to do. */
    fun problem(promptTokens: Int): String? = when {
        promptTokens <= 0 -> "the prompt is empty"
        promptTokens > maxPromptTokens ->
            "the prompt is $promptTokens tokens but this bundle's context (max_context) is $maxContext tokens: shorten the prompt to at most $maxPromptTokens tokens, or re-export with a larger --max-seq-len"
        else -> null
    }

    /** New tokens that still fit after the prompt, capped at `requested`. */
    fun newTokens(promptTokens: Int, requested: Int): Int {
        val room = maxContext - promptTokens
        return if (room < 0) 0 else if (requested < room) requested else room
    }
}

/**
 * MobileLLM is trained with BOS first, and the exporter's parity check feeds manifest bos_id first.
 * A runtime tokenizer told to add special tokens already does (the bundle's tokenizer.json has a BOS
 * template); this makes it exactly one BOS either way, so a tokenizer without the template still
 * gives the model what it was trained on.
 */
object PromptIds {
    fun withLeadingBos(ids: IntArray, bosId: Int): IntArray {
        if (ids.isNotEmpty() && ids[0] == bosId) return ids
        val out = IntArray(ids.size + 1)
        out[0] = bosId
        System.arraycopy(ids, 0, out, 1, ids.size)
        return out
    }
}

/** Prefill and decode tokens/s from timestamps the app records (nanoseconds). */
class Throughput {
    private var startNs = 0L
    private var firstTokenNs = 0L
    private var lastTokenNs = 0L
    var promptTokens = 0
        private set
    var generated = 0
        private set

    fun start(nowNs: Long, promptTokens: Int) {
        startNs = nowNs; firstTokenNs = 0L; lastTokenNs = 0L; generated = 0; this.promptTokens = promptTokens
    }

    fun token(nowNs: Long) {
        if (generated == 0) firstTokenNs = nowNs
        lastTokenNs = nowNs
        generated++
    }

    /** Prompt tokens per second of the prefill (start to first token). */
    fun prefillTokensPerSecond(): Double = rate(promptTokens, firstTokenNs - startNs)

    /** Tokens per second after the first token (the decode loop). */
    fun decodeTokensPerSecond(): Double = rate(generated - 1, lastTokenNs - firstTokenNs)

    /** Generated tokens per second over the whole request. */
    fun overallTokensPerSecond(): Double = rate(generated, lastTokenNs - startNs)

    companion object {
        fun rate(tokens: Int, ns: Long): Double = if (tokens <= 0 || ns <= 0L) 0.0 else tokens * 1e9 / ns

        fun format(tps: Double): String = if (tps <= 0.0) "–" else String.format(java.util.Locale.US, "%.1f tok/s", tps)
    }
}

/**
 * ExecuTorch's stats JSON (LlmCallback.onStats, extension/llm/runner/stats.h): timestamps in
 * units of SCALING_FACTOR_UNITS_PER_SECOND (ms), prompt and generated token counts.
 */
class RunnerStats(
    val promptTokens: Long,
    val generatedTokens: Long,
    val modelLoadMs: Double,
    val prefillTokensPerSecond: Double,
    val decodeTokensPerSecond: Double,
    val timeToFirstTokenMs: Double
) {
    companion object {
        /** Parses the stats JSON with org.json; throws org.json.JSONException when it is not a JSON object. */
        fun parse(json: String): RunnerStats {
            val m = JSONObject(json)
            fun num(k: String): Double = m.optDouble(k, 0.0)
            val scale = if (num("SCALING_FACTOR_UNITS_PER_SECOND") > 0) num("SCALING_FACTOR_UNITS_PER_SECOND") else 1000.0
            val prompt = num("prompt_tokens")
            val gen = num("generated_tokens")
            val start = num("inference_start_ms")
            val promptEnd = num("prompt_eval_end_ms")
            val end = num("inference_end_ms")
            fun perSecond(n: Double, units: Double): Double = if (n <= 0 || units <= 0) 0.0 else n * scale / units
            return RunnerStats(
                prompt.toLong(), gen.toLong(),
                (num("model_load_end_ms") - num("model_load_start_ms")) * 1000.0 / scale,
                perSecond(prompt, promptEnd - start),
                perSecond(gen, end - promptEnd),
                (num("first_token_ms") - start) * 1000.0 / scale
            )
        }
    }
}
