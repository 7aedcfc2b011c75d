package org.mobilellm.demo.core

import kotlin.math.exp

// Platform-free (no android.* imports): sampling, stop tokens, context budget and tokens/s.
// The Swift app (ios_demo/MobileLLMDemo/Generation.swift) mirrors these rules.

/** Greedy (temperature <= 0) or temperature sampling with optional top-k. */
class Sampler(val temperature: Float, val topK: Int = 0, seed: Long = 0L) {
    private val rng = java.util.Random(seed)

    /** Samples from logits[offset until offset + vocab] (one row of [S, vocab] logits). */
    fun sample(logits: FloatArray, offset: Int = 0, vocab: Int = logits.size - offset): Int {
        require(vocab > 0 && offset >= 0 && offset + vocab <= logits.size) { "logits row out of range" }
        if (temperature <= 0f) return argmax(logits, offset, vocab)
        // Candidates: all ids, or the top-k by logit.
        var cand = IntArray(vocab) { it }
        if (topK in 1 until vocab) {
            val sorted = cand.sortedWith(Comparator { a, b -> java.lang.Float.compare(logits[offset + b], logits[offset + a]) })
            cand = IntArray(topK) { sorted[it] }
        }
        var maxLogit = Float.NEGATIVE_INFINITY
        for (id in cand) if (logits[offset + id] > maxLogit) maxLogit = logits[offset + id]
        val probs = DoubleArray(cand.size)
        var total = 0.0
        for ((k, id) in cand.withIndex()) {
            val p = exp(((logits[offset + id] - maxLogit) / temperature).toDouble())
            probs[k] = p
            total += p
        }
        var r = rng.nextDouble() * total
        for ((k, id) in cand.withIndex()) {
            r -= probs[k]
            if (r <= 0.0) return id
        }
        return cand[cand.size - 1]
    }

    companion object {
        /** Index of the largest logit; the lowest index wins ties. NaN never wins. */
        fun argmax(logits: FloatArray, offset: Int = 0, vocab: Int = logits.size - offset): Int {
            var best = 0
            var bestV = Float.NEGATIVE_INFINITY
            for (k in 0 until vocab) {
                val v = logits[offset + k]
                if (v > bestV) { bestV = v; best = k }
            }
            return best
        }
    }
}

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

    /** seqLen for ExecuTorch's LlmModule.generate: prompt + new tokens, never above max_context. */
    fun seqLen(promptTokens: Int, requestedNew: Int): Int = promptTokens + newTokens(promptTokens, requestedNew)
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
        fun parse(json: String): RunnerStats {
            @Suppress("UNCHECKED_CAST")
            val m = Json.parse(json) as? Map<String, Any?> ?: throw JsonException("stats: not an object")
            fun num(k: String): Double = when (val v = m[k]) { is Long -> v.toDouble(); is Double -> v; else -> 0.0 }
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
