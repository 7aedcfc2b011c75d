package org.mobilellm.demo

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import org.mobilellm.demo.core.Manifest
import org.mobilellm.demo.core.PromptBudget
import org.mobilellm.demo.core.PromptIds
import org.mobilellm.demo.core.RunnerStats
import org.mobilellm.demo.core.StopReason
import org.mobilellm.demo.core.StopRule
import org.mobilellm.demo.core.Throughput
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.File

// The app carries no tokenizer: each runtime tokenizes with the bundle's files itself. ExecuTorch's
// LlmModule (its C++ TextLLMRunner, tokenizers from pytorch-tokenizers) reads the original file manifest
// `tokenizer` names: tokenizer.model, or tokenizer.json for byte-level BPE checkpoints (ExecuTorch 1.5.1's
// runner refuses the tokenizer.json converted from a SentencePiece model). onnxruntime-genai's Tokenizer
// reads the tokenizer.json + tokenizer_config.json beside genai_config.json in the bundle folder.

/** What the UI hears while a generation runs (called on the generation thread). */
interface GenerationListener {
    fun onText(delta: String)
    fun onProgress(throughput: Throughput)
    fun onRunnerStats(stats: RunnerStats)
    fun onDone(reason: String)
}

/** A checked bundle: its folder and manifest. */
class LoadedBundle(val dir: File, val manifest: Manifest) {
    val modelFile: File = File(dir, manifest.artifact)
    /** The original tokenizer file (manifest `tokenizer`); tokenizer.json sits beside it in every bundle. */
    val tokenizerFile: File = File(dir, manifest.tokenizer)
    val budget = PromptBudget(manifest.maxContext)
}

interface Engine {
    val label: String
    fun generate(prompt: String, maxNewTokens: Int, temperature: Float, listener: GenerationListener)
    fun stop()
    fun close()
}

/**
 * ExecuTorch bundles: the AAR's LlmModule, i.e. ExecuTorch's stock C++ TextLLMRunner. It tokenizes
 * with the bundle's tokenizer file, prefills, samples and stops on the .pte's get_eos_ids metadata
 * itself; the app never sees token ids.
 *
 * BOS: generate(prompt, seqLen, callback, echo, temperature, numBos = 1, numEos = 0) asks the runner
 * for one BOS (its default is 0, and MobileLLM is trained with BOS first). With tokenizer.model the
 * SentencePiece tokenizer prepends one BOS; with tokenizer.json pytorch-tokenizers applies the file's
 * BOS template when numBos > 0. The id is the tokenizer's, the same as manifest bos_id.
 *
 * Length: the runner counts the prompt itself and refuses one that does not fit max_context (an
 * ExecutorchRuntimeException, shown to the user); seqLen = manifest max_context lets it use the whole
 * cache and the app calls stop() once `maxNewTokens` pieces have arrived.
 */
class LlmModuleEngine(private val bundle: LoadedBundle, temperature: Float) : Engine {
    override val label = "ExecuTorch LlmModule"
    private val module = LlmModule(bundle.modelFile.absolutePath, bundle.tokenizerFile.absolutePath, temperature)

    init {
        module.load() // throws ExecutorchRuntimeException when the program or tokenizer cannot be loaded
    }

    override fun generate(prompt: String, maxNewTokens: Int, temperature: Float, listener: GenerationListener) {
        val maxContext = bundle.manifest.maxContext
        val throughput = Throughput()
        throughput.start(System.nanoTime(), 0) // prompt length comes with the runner's stats
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                if (throughput.generated >= maxNewTokens) return // pieces the runner made before it saw stop()
                throughput.token(System.nanoTime())
                listener.onText(result)
                listener.onProgress(throughput)
                if (throughput.generated >= maxNewTokens) module.stop()
            }

            override fun onStats(stats: String) {
                try { listener.onRunnerStats(RunnerStats.parse(stats)) } catch (e: Exception) { /* stats are informational */ }
            }
        }
        try {
            module.generate(prompt, maxContext, callback, false, temperature, 1, 0)
        } catch (e: RuntimeException) {
            listener.onDone("ExecuTorch: ${e.message ?: e.toString()} (a prompt must fit the context of $maxContext tokens with BOS)")
            return
        }
        listener.onDone("done (${throughput.generated} tokens)")
    }

    override fun stop() = module.stop()

    override fun close() = module.close()
}

/**
 * ONNX bundles: onnxruntime-genai's Java API over the bundle folder (genai_config.json, model.onnx,
 * tokenizer.json, tokenizer_config.json). genai tokenizes, samples (greedy, or do_sample at the
 * temperature) and stops on genai_config's eos_token_id and max_length; the app adds the manifest's
 * stop rule (eos_ids, max_context, max new tokens) to say why it stopped.
 *
 * BOS: genai's tokenizer adds no special tokens unless told: updateOptions(add_special_tokens=true)
 * (Tokenizer.updateOptions, onnxruntime-genai >= 0.11) makes it apply tokenizer.json's BOS template,
 * and PromptIds.withLeadingBos makes sure manifest bos_id leads the prompt exactly once.
 */
class GenaiEngine(private val bundle: LoadedBundle) : Engine {
    override val label = "onnxruntime-genai"
    private val model = Model(bundle.dir.absolutePath)
    private val tokenizer = Tokenizer(model)
    @Volatile private var stopRequested = false

    init {
        val options = HashMap<String, String>()
        options["add_special_tokens"] = "true"
        tokenizer.updateOptions(options)
    }

    /** Prompt ids as the model sees them: manifest bos_id first, then genai's tokens of the text. */
    fun promptIds(prompt: String): IntArray {
        val sequences = tokenizer.encode(prompt)
        try {
            return PromptIds.withLeadingBos(sequences.getSequence(0), bundle.manifest.bosId)
        } finally {
            sequences.close()
        }
    }

    override fun generate(prompt: String, maxNewTokens: Int, temperature: Float, listener: GenerationListener) {
        stopRequested = false
        val ids = promptIds(prompt)
        val problem = bundle.budget.problem(ids.size)
        if (problem != null) { listener.onDone(problem); return }
        val newTokens = bundle.budget.newTokens(ids.size, maxNewTokens)
        val params = GeneratorParams(model)
        val rule = StopRule(bundle.manifest.eosIds, bundle.manifest.maxContext, newTokens)
        try {
            params.setSearchOption("max_length", (ids.size + newTokens).toDouble())
            if (temperature > 0f) {
                params.setSearchOption("do_sample", true)
                params.setSearchOption("temperature", temperature.toDouble())
            } else {
                params.setSearchOption("do_sample", false)
            }
            val generator = Generator(model, params)
            val stream = tokenizer.createStream()
            try {
                val throughput = Throughput()
                throughput.start(System.nanoTime(), ids.size)
                generator.appendTokens(ids)
                var reason: StopReason? = null
                while (reason == null && !generator.isDone()) {
                    generator.generateNextToken()
                    val next = generator.getLastTokenInSequence(0)
                    throughput.token(System.nanoTime())
                    reason = if (stopRequested) StopReason.USER else rule.check(next, ids.size, throughput.generated)
                    if (!rule.isEos(next)) listener.onText(stream.decode(next))
                    listener.onProgress(throughput)
                }
                val why = reason?.label ?: "generator done (genai_config eos / max_length)"
                listener.onDone("$why (${throughput.generated} tokens, prompt ${ids.size})")
            } finally {
                stream.close()
                generator.close()
            }
        } finally {
            params.close()
        }
    }

    override fun stop() { stopRequested = true }

    override fun close() {
        tokenizer.close()
        model.close()
    }
}
