package org.mobilellm.demo

import android.app.Activity
import android.content.Intent
import android.net.Uri
import android.os.Bundle
import android.provider.DocumentsContract
import android.text.InputType
import android.view.View
import android.view.ViewGroup
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.CheckBox
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import org.mobilellm.demo.core.BundleValidator
import org.mobilellm.demo.core.Manifest
import org.mobilellm.demo.core.RunnerStats
import org.mobilellm.demo.core.Throughput
import java.io.File

/**
 * Pick a bundle (a folder written by `mobilellm-export --target executorch` or `--target onnx`),
 * check it against its manifest.json, load it with its runtime (ExecuTorch's LlmModule, or
 * onnxruntime-genai), and stream generated text with tokens/s. The runtimes tokenize; the app has
 * no tokenizer of its own.
 *
 * Bundles are found in (1) the app's external files dir, where `adb push BUNDLE
 * /sdcard/Android/data/org.mobilellm.demo/files/` puts them, (2) the app's internal files dir
 * (`adb shell run-as org.mobilellm.demo ...`), (3) /data/local/tmp/mobilellm/ where readable, or
 * (4) any folder picked with the system picker, which is copied into the internal files dir first
 * (the runtime needs real file paths, not content:// URIs).
 */
class MainActivity : Activity() {
    private lateinit var bundleSpinner: Spinner
    private lateinit var info: TextView
    private lateinit var verifyHashes: CheckBox
    private lateinit var temperatureEdit: EditText
    private lateinit var maxTokensEdit: EditText
    private lateinit var promptEdit: EditText
    private lateinit var runButton: Button
    private lateinit var output: TextView
    private lateinit var stats: TextView

    private var bundleDirs: List<File> = emptyList()
    private var bundle: LoadedBundle? = null
    private var engine: Engine? = null
    @Volatile private var running = false

    companion object {
        private const val PICK_FOLDER = 1
        /** manifest `target`s this app runs: ExecuTorch (.pte) with LlmModule, ONNX with onnxruntime-genai. */
        private val TARGETS = listOf("executorch", "onnx")
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(buildUi())
        refreshBundles()
    }

    override fun onDestroy() {
        engine?.stop()
        if (!running) engine?.close()
        super.onDestroy()
    }

    // ------------------------------------------------------------------ UI
    private fun buildUi(): View {
        val pad = (12 * resources.displayMetrics.density).toInt()
        val col = LinearLayout(this)
        col.orientation = LinearLayout.VERTICAL
        col.setPadding(pad, pad, pad, pad)
        fun row(vararg views: View): LinearLayout {
            val r = LinearLayout(this)
            r.orientation = LinearLayout.HORIZONTAL
            for (v in views) r.addView(v, LinearLayout.LayoutParams(0, ViewGroup.LayoutParams.WRAP_CONTENT, 1f))
            return r
        }
        fun button(text: String, onClick: () -> Unit): Button {
            val b = Button(this)
            b.text = text
            b.setOnClickListener { onClick() }
            return b
        }

        bundleSpinner = Spinner(this)
        col.addView(bundleSpinner)
        col.addView(row(button("Rescan") { refreshBundles() }, button("Pick folder…") { pickFolder() }, button("Load") { loadSelected() }))
        verifyHashes = CheckBox(this)
        verifyHashes.text = "Verify sha256 of the model and tokenizer on load"
        col.addView(verifyHashes)
        info = TextView(this)
        info.setTextIsSelectable(true)
        col.addView(info)

        temperatureEdit = EditText(this)
        temperatureEdit.hint = "temperature (0 = greedy)"
        temperatureEdit.setText("0")
        temperatureEdit.inputType = InputType.TYPE_CLASS_NUMBER or InputType.TYPE_NUMBER_FLAG_DECIMAL
        maxTokensEdit = EditText(this)
        maxTokensEdit.hint = "max new tokens"
        maxTokensEdit.setText("128")
        maxTokensEdit.inputType = InputType.TYPE_CLASS_NUMBER
        col.addView(row(temperatureEdit, maxTokensEdit))

        promptEdit = EditText(this)
        promptEdit.hint = "Prompt"
        promptEdit.setText("In the beginning")
        promptEdit.minLines = 2
        col.addView(promptEdit)
        runButton = button("Generate") { if (running) engine?.stop() else generate() }
        runButton.isEnabled = false
        col.addView(runButton)
        stats = TextView(this)
        col.addView(stats)
        output = TextView(this)
        output.setTextIsSelectable(true)
        col.addView(output)

        val scroll = ScrollView(this)
        scroll.addView(col)
        return scroll
    }

    private fun say(text: String) = runOnUiThread { info.text = text }

    // ------------------------------------------------------------------ finding bundles
    private fun searchRoots(): List<File> {
        val roots = ArrayList<File>()
        getExternalFilesDir(null)?.let { roots.add(it) }
        roots.add(filesDir)
        roots.add(File(filesDir, "bundles"))
        roots.add(File("/data/local/tmp/mobilellm"))
        return roots
    }

    private fun refreshBundles() {
        val found = ArrayList<File>()
        for (root in searchRoots()) {
            if (File(root, Manifest.FILE_NAME).isFile) found.add(root)
            val children = root.listFiles() ?: continue
            for (c in children.sortedBy { it.name }) if (c.isDirectory && File(c, Manifest.FILE_NAME).isFile) found.add(c)
        }
        bundleDirs = found
        val labels = found.map { it.name + "  (" + (it.parent ?: "") + ")" }
        bundleSpinner.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, labels)
        info.text = if (found.isEmpty()) {
            "No bundle found. Export one with `mobilellm-export --target executorch --output dist/` (or --target onnx), then\n" +
                "adb push dist/<name>-executorch-4bit ${getExternalFilesDir(null)?.path ?: "/sdcard/Android/data/$packageName/files"}/\n" +
                "and tap Rescan, or tap Pick folder…"
        } else "${found.size} bundle(s) found; pick one and tap Load."
    }

    // ------------------------------------------------------------------ loading
    private fun loadSelected() {
        if (running) { say("Stop the generation first."); return }
        val k = bundleSpinner.selectedItemPosition
        if (k < 0 || k >= bundleDirs.size) { say("Pick a bundle first."); return }
        val dir = bundleDirs[k]
        val hashes = verifyHashes.isChecked
        val temperature = temperatureEdit.text.toString().toFloatOrNull() ?: 0f
        runButton.isEnabled = false
        say("Checking ${dir.name} …")
        Thread {
            try {
                val manifest = Manifest.load(dir)
                val report = BundleValidator.validate(dir, manifest, TARGETS, checkHashes = hashes)
                if (!report.ok) {
                    say("Cannot use ${dir.name}:\n• " + report.errors.joinToString("\n• "))
                    return@Thread
                }
                val loaded = LoadedBundle(dir, manifest)
                engine?.close()
                engine = null
                bundle = null
                say("Loading ${manifest.artifact} …")
                val e = if (manifest.target == "onnx") GenaiEngine(loaded) else LlmModuleEngine(loaded, temperature)
                engine = e
                bundle = loaded
                val parity = when (manifest.parityPassed) { null -> "not run"; true -> "passed"; false -> "FAILED" }
                val text = StringBuilder()
                text.append("${manifest.name}: ${manifest.artifact} (${manifest.bits}-bit) with ${e.label}, tokenizer ${manifest.tokenizer}\n")
                text.append("model: dim ${manifest.modelDim}, ${manifest.modelLayers} stored / ${manifest.modelApplied} applied blocks (${manifest.layerSharing} sharing)\n")
                text.append("context ${manifest.maxContext} tokens, vocab ${manifest.vocabSize}, BOS ${manifest.bosId}, EOS ${manifest.eosIds}\n")
                text.append("inputs ${manifest.inputs}; outputs ${manifest.outputs}\n")
                text.append("parity at export: $parity")
                for (w in report.warnings) text.append("\n⚠ ").append(w)
                say(text.toString())
                runOnUiThread { runButton.isEnabled = true }
            } catch (e: Exception) {
                say("Cannot load ${dir.name}: ${e.message ?: e.toString()}")
            }
        }.start()
    }

    // ------------------------------------------------------------------ generating
    private fun generate() {
        val b = bundle ?: return
        val e = engine ?: return
        val prompt = promptEdit.text.toString()
        if (prompt.trim().length == 0) { stats.text = "the prompt is empty"; return }
        val temperature = temperatureEdit.text.toString().toFloatOrNull() ?: 0f
        val maxNew = maxTokensEdit.text.toString().toIntOrNull() ?: 128
        output.text = prompt
        stats.text = "${e.label}: context ${b.manifest.maxContext} tokens; generating…"
        running = true
        runButton.text = "Stop"
        Thread {
            try {
                e.generate(prompt, maxNew, temperature, object : GenerationListener {
                    override fun onText(delta: String) { runOnUiThread { output.append(delta) } }
                    override fun onProgress(throughput: Throughput) {
                        val line = "${throughput.generated} tokens · prefill ${Throughput.format(throughput.prefillTokensPerSecond())} · " +
                            "decode ${Throughput.format(throughput.decodeTokensPerSecond())}"
                        runOnUiThread { stats.text = line }
                    }
                    override fun onRunnerStats(stats: RunnerStats) {
                        val line = "runner: prompt ${stats.promptTokens} tok at ${Throughput.format(stats.prefillTokensPerSecond)}, " +
                            "${stats.generatedTokens} generated at ${Throughput.format(stats.decodeTokensPerSecond)}, " +
                            "first token ${stats.timeToFirstTokenMs.toLong()} ms"
                        runOnUiThread { this@MainActivity.stats.append("\n" + line) }
                    }
                    override fun onDone(reason: String) { runOnUiThread { this@MainActivity.stats.append("\n" + reason) } }
                })
            } catch (e: Throwable) {
                runOnUiThread { stats.append("\nerror: ${e.message ?: e.toString()}") }
            } finally {
                running = false
                runOnUiThread { runButton.text = "Generate" }
            }
        }.start()
    }

    // ------------------------------------------------------------------ system folder picker
    private fun pickFolder() {
        startActivityForResult(Intent(Intent.ACTION_OPEN_DOCUMENT_TREE), PICK_FOLDER)
    }

    @Deprecated("Activity result API without androidx")
    override fun onActivityResult(requestCode: Int, resultCode: Int, data: Intent?) {
        super.onActivityResult(requestCode, resultCode, data)
        val tree = data?.data
        if (requestCode != PICK_FOLDER || resultCode != RESULT_OK || tree == null) return
        say("Copying the picked bundle into app storage …")
        Thread {
            try {
                val dest = copyTree(tree)
                runOnUiThread { refreshBundles(); say("Copied to ${dest.path}; select it and tap Load.") }
            } catch (e: Exception) {
                say("Copy failed: ${e.message ?: e.toString()}")
            }
        }.start()
    }

    /** Copies a picked document tree (the bundle folder) into filesDir/bundles/<name>/. */
    private fun copyTree(tree: Uri): File {
        val rootId = DocumentsContract.getTreeDocumentId(tree)
        val name = rootId.substringAfterLast('/').substringAfterLast(':').ifBlankThen("bundle")
        val dest = File(File(filesDir, "bundles"), name)
        copyChildren(tree, rootId, dest)
        if (!File(dest, Manifest.FILE_NAME).isFile) throw IllegalStateException("the picked folder has no ${Manifest.FILE_NAME}")
        return dest
    }

    private fun copyChildren(tree: Uri, parentId: String, dest: File) {
        dest.mkdirs()
        val children = DocumentsContract.buildChildDocumentsUriUsingTree(tree, parentId)
        val cols = arrayOf(DocumentsContract.Document.COLUMN_DOCUMENT_ID, DocumentsContract.Document.COLUMN_DISPLAY_NAME,
            DocumentsContract.Document.COLUMN_MIME_TYPE)
        val cursor = contentResolver.query(children, cols, null, null, null) ?: return
        cursor.use { c ->
            while (c.moveToNext()) {
                val id = c.getString(0)
                val display = c.getString(1)
                val mime = c.getString(2)
                if (display.contains('/') || display == ".." || display == ".") continue
                if (mime == DocumentsContract.Document.MIME_TYPE_DIR) {
                    copyChildren(tree, id, File(dest, display))
                } else {
                    val input = contentResolver.openInputStream(DocumentsContract.buildDocumentUriUsingTree(tree, id)) ?: continue
                    input.use { i -> File(dest, display).outputStream().use { o -> i.copyTo(o, 1 shl 20) } }
                }
            }
        }
    }

    private fun String.ifBlankThen(fallback: String): String = if (this.trim().length == 0) fallback else this
}
