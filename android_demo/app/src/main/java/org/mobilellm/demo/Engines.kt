package org.mobilellm.demo

import org.mobilellm.demo.core.Manifest
import org.mobilellm.demo.core.PromptBudget
import org.mobilellm.demo.core.RunnerStats
import org.mobilellm.demo.core.Sampler
import org.mobilellm.demo.core.SentencePieceTokenizer
import org.mobilellm.demo.core.StopReason
import org.mobilellm.demo.core.StopRule
import org.mobilellm.demo.core.StreamingDecoder
import org.mobilellm.demo.core.TensorSpec
import org.mobilellm.demo.core.Throughput
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.File

/** What the UI hears while a generation runs (called on the generation thread). */
interface GenerationListener {
    fun onText(delta: String)
    fun onProgress(throughput: Throughput)
    fun onRunnerStats(stats: RunnerStats)
    fun onDone(reason: String)
}

/** A loaded bundle: its folder, manifest and the SentencePiece tokenizer the manifest names. */
class LoadedBundle(val dir: File, val manifest: Manifest) {
    val modelFile: File = File(dir, manifest.artifact)
    val tokenizerFile: File = File(dir, manifest.tokenizer)
    val tokenizer: SentencePieceTokenizer = SentencePieceTokenizer.load(tokenizerFile)
    val budget = PromptBudget(manifest.maxContext)

    /** Prompt ids as the model sees them: manifest bos_id first. */
    fun promptIds(prompt: String): IntArray {
        val body = tokenizer.encode(prompt, addBos = false)
        val ids = IntArray(body.size + 1)
        ids[0] = manifest.bosId
        System.arraycopy(body, 0, ids, 1, body.size)
        return ids
    }
}

interface Engine {
    val label: String
    fun generate(prompt: String, maxNewTokens: Int, temperature: Float, listener: GenerationListener)
    fun stop()
    fun close()
}

/**
 * ExecuTorch's stock LLM runner through the AAR's LlmModule: it tokenizes, prefills, samples and
 * stops on the .pte's get_eos_ids metadata itself. The app checks the prompt against manifest
 * max_context first and derives seqLen (prompt + new tokens) from it.
 */
class LlmModuleEngine(private val bundle: LoadedBundle, temperature: Float) : Engine {
    override val label = "ExecuTorch LlmModule"
    private val module = LlmModule(bundle.modelFile.absolutePath, bundle.tokenizerFile.absolutePath, temperature)

    init {
        // load() returns an error code in older AARs and throws in newer ones; accept both.
        val status: Any? = module.load()
        if (status is Int && status != 0) throw IllegalStateException("LlmModule.load() failed with ExecuTorch error $status")
    }

    override fun generate(prompt: String, maxNewTokens: Int, temperature: Float, listener: GenerationListener) {
        val promptTokens = bundle.promptIds(prompt).size
        val problem = bundle.budget.problem(promptTokens)
        if (problem != null) { listener.onDone(problem); return }
        val seqLen = bundle.budget.seqLen(promptTokens, maxNewTokens)
        val throughput = Throughput()
        throughput.start(System.nanoTime(), promptTokens)
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                throughput.token(System.nanoTime())
                listener.onText(result)
                listener.onProgress(throughput)
            }

            override fun onStats(stats: String) {
                try { listener.onRunnerStats(RunnerStats.parse(stats)) } catch (e: Exception) { /* stats are informational */ }
            }
        }
        val status = runGenerate(prompt, seqLen, callback, temperature)
        listener.onDone(if (status is Int && status != 0) "ExecuTorch error $status" else "done (${throughput.generated} tokens)")
    }

    /**
     * generate(prompt, seqLen, callback, echo, temperature, numBos, numEos) where the AAR has it, so the
     * runner prepends exactly one BOS (the id comes from the .pte metadata, which the exporter writes
     * from the same config as manifest bos_id); else generate(prompt, seqLen, callback, echo).
     */
    private fun runGenerate(prompt: String, seqLen: Int, callback: LlmCallback, temperature: Float): Any? {
        val seven = try {
            LlmModule::class.java.getMethod("generate", String::class.java, Int::class.javaPrimitiveType, LlmCallback::class.java,
                Boolean::class.javaPrimitiveType, Float::class.javaPrimitiveType, Int::class.javaPrimitiveType, Int::class.javaPrimitiveType)
        } catch (e: NoSuchMethodException) { null }
        if (seven != null) {
            return try { seven.invoke(module, prompt, seqLen, callback, false, temperature, 1, 0) }
            catch (e: java.lang.reflect.InvocationTargetException) { throw e.targetException ?: e }
        }
        return module.generate(prompt, seqLen, callback, false)
    }

    override fun stop() = module.stop()

    override fun close() = module.resetNative()
}

/**
 * The app's own loop over the .pte's `forward` (org.pytorch.executorch.Module): our SentencePiece
 * tokenizer, prefill, then one token at a time with the KV cache inside the program, our sampler, and
 * stops on manifest eos_ids / max_context. Input order and dtypes come from manifest io.inputs (the
 * rank-2 input takes token ids [1, S], the rank-1 input the start position [1]).
 */
class ManualLoopEngine(private val bundle: LoadedBundle) : Engine {
    override val label = "Manual loop (Module.forward)"
    @Volatile private var stopRequested = false
    private val inputs: List<TensorSpec> = bundle.manifest.inputs
    private val tokensIndex: Int
    private val posIndex: Int
    private val vocab: Int = bundle.manifest.vocabSize

    init {
        val t = inputs.indexOfFirst { it.shape.size == 2 }
        val p = inputs.indexOfFirst { it.shape.size == 1 }
        if (inputs.size != 2 || t < 0 || p < 0) {
            throw IllegalStateException("manifest io.inputs must be token ids [1, S] and a start position [1]; found $inputs")
        }
        tokensIndex = t
        posIndex = p
    }

    private fun tensor(spec: TensorSpec, values: IntArray, shape: LongArray): Tensor = when (spec.dtype) {
        "int64" -> Tensor.fromBlob(LongArray(values.size) { values[it].toLong() }, shape)
        "int32" -> Tensor.fromBlob(values, shape)
        else -> throw IllegalStateException("input ${spec.name} has dtype ${spec.dtype}; expected int32 or int64")
    }

    private fun forward(module: Module, ids: IntArray, start: Int): FloatArray {
        val args = arrayOfNulls<EValue>(2)
        args[tokensIndex] = EValue.from(tensor(inputs[tokensIndex], ids, longArrayOf(1L, ids.size.toLong())))
        args[posIndex] = EValue.from(tensor(inputs[posIndex], intArrayOf(start), longArrayOf(1L)))
        val out = module.forward(*args.requireNoNulls())
        return out[0].toTensor().getDataAsFloatArray()
    }

    override fun generate(prompt: String, maxNewTokens: Int, temperature: Float, listener: GenerationListener) {
        stopRequested = false
        val ids = bundle.promptIds(prompt)
        val problem = bundle.budget.problem(ids.size)
        if (problem != null) { listener.onDone(problem); return }
        val module = Module.load(bundle.modelFile.absolutePath) // fresh KV cache per request
        try {
            val sampler = Sampler(temperature, topK = 0, seed = System.nanoTime())
            val rule = StopRule(bundle.manifest.eosIds, bundle.manifest.maxContext, maxNewTokens)
            val decoder = StreamingDecoder(bundle.tokenizer, startOfText = false)
            val throughput = Throughput()
            throughput.start(System.nanoTime(), ids.size)
            var logits = forward(module, ids, 0)
            var pos = ids.size
            var generated = 0
            while (true) {
                val rows = logits.size / vocab
                val next = sampler.sample(logits, (rows - 1) * vocab, vocab)
                generated++
                throughput.token(System.nanoTime())
                val reason: StopReason? = if (stopRequested) StopReason.USER else rule.check(next, ids.size, generated)
                if (!rule.isEos(next)) listener.onText(decoder.push(next))
                listener.onProgress(throughput)
                if (reason != null) { listener.onDone("${reason.label} ($generated tokens)"); return }
                logits = forward(module, intArrayOf(next), pos)
                pos++
            }
        } finally {
            module.destroy()
        }
    }

    override fun stop() { stopRequested = true }

    override fun close() {}
}
