package org.mobilellm.demo.core

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject
import java.io.File
import java.security.MessageDigest

// Platform-free (no android.* imports). manifest.json is parsed with org.json, the JSON library built
// into Android (on a JVM: Debian's libandroid-json-java, the same code from AOSP libcore). Every key
// the Android app reads goes through the accessors of [Manifest] below (string/int/long/double/bool/
// optBool/intList/stringList/tensors/fileEntries/has with a literal dotted key path), so
// tests/test_demo_apps.py can list them with a regex and check each against the manifest schema and
// a real exported bundle.

class ManifestException(message: String) : Exception(message)

/** One tensor of manifest io.inputs / io.outputs / io.states: {name, dtype, shape} (shape: Long or String items). */
class TensorSpec(val name: String, val dtype: String, val shape: List<Any?>) {
    override fun toString(): String = "$name $dtype $shape"
}

/** One manifest files entry: {sha256, bytes}. */
class FileEntry(val sha256: String, val bytes: Long)

class Manifest(private val root: JSONObject) {

    companion object {
        const val FILE_NAME = "manifest.json"
        const val SCHEMA_VERSION = 1

        fun parse(text: String): Manifest {
            val root = try { JSONObject(text) } catch (e: JSONException) {
                throw ManifestException("manifest.json is not a JSON object: ${e.message}")
            }
            return Manifest(root)
        }

        fun load(bundleDir: File): Manifest {
            val f = File(bundleDir, FILE_NAME)
            if (!f.isFile) throw ManifestException("${bundleDir.path}: no $FILE_NAME; is this a bundle written by mobilellm-export?")
            return parse(f.readText(Charsets.UTF_8))
        }

        /** A JSON integer as Long (org.json gives Integer or Long; other libraries may give BigInteger), else null. */
        fun integer(v: Any?): Long? = when (v) {
            is Int -> v.toLong()
            is Long -> v
            is java.math.BigInteger -> if (v.bitLength() < 64) v.toLong() else null
            else -> null
        }

        /** org.json's JSONObject.NULL as Kotlin null. */
        private fun plain(v: Any?): Any? = if (JSONObject.NULL.equals(v)) null else v
    }

    // ---------------------------------------------------------------- generic accessors
    private fun lookup(path: String): Any? {
        var cur: Any? = root
        for (part in path.split('.')) {
            val o = cur as? JSONObject ?: throw ManifestException("manifest: '$path' not found ('$part' is not inside an object)")
            if (!o.has(part)) throw ManifestException("manifest: missing key '$path'; re-export the bundle with mobilellm-export")
            cur = plain(o.get(part))
        }
        return cur
    }

    private fun wrong(path: String, what: String, v: Any?): Nothing =
        throw ManifestException("manifest: '$path' must be $what, found ${if (v == null) "null" else v.toString()}")

    fun has(path: String): Boolean = try { lookup(path); true } catch (e: ManifestException) { false }

    fun string(path: String): String { val v = lookup(path); return v as? String ?: wrong(path, "a string", v) }

    fun long(path: String): Long { val v = lookup(path); return integer(v) ?: wrong(path, "an integer", v) }

    fun int(path: String): Int {
        val l = long(path)
        if (l < Int.MIN_VALUE || l > Int.MAX_VALUE) wrong(path, "a 32-bit integer", l)
        return l.toInt()
    }

    fun double(path: String): Double { val v = lookup(path); return (v as? Number)?.toDouble() ?: wrong(path, "a number", v) }

    fun bool(path: String): Boolean { val v = lookup(path); return v as? Boolean ?: wrong(path, "true or false", v) }

    /** null when the value (or a parent object, e.g. "parity" when no parity ran) is null. */
    fun optBool(path: String): Boolean? {
        var cur: Any? = root
        for (part in path.split('.')) {
            if (cur == null) return null
            val o = cur as? JSONObject ?: wrong(path, "inside an object", cur)
            if (!o.has(part)) throw ManifestException("manifest: missing key '$path'")
            cur = plain(o.get(part))
        }
        if (cur == null) return null
        return cur as? Boolean ?: wrong(path, "true, false or null", cur)
    }

    private fun items(path: String, v: Any?, what: String): List<Any?> {
        val a = v as? JSONArray ?: wrong(path, what, v)
        return List(a.length()) { plain(a.get(it)) }
    }

    fun intList(path: String): List<Int> {
        val v = lookup(path)
        return items(path, v, "a list of integers").map { x ->
            val l = integer(x) ?: wrong(path, "a list of integers", v)
            if (l < Int.MIN_VALUE || l > Int.MAX_VALUE) wrong(path, "a list of 32-bit integers", v)
            l.toInt()
        }
    }

    fun stringList(path: String): List<String> {
        val v = lookup(path)
        return items(path, v, "a list of strings").map { x -> x as? String ?: wrong(path, "a list of strings", v) }
    }

    /** A list of {name, dtype, shape}; an absent optional list (e.g. io.states) is empty. */
    fun tensors(path: String): List<TensorSpec> {
        if (!has(path)) return emptyList()
        return items(path, lookup(path), "a list of tensors").map { t ->
            val o = t as? JSONObject ?: wrong(path, "a list of {name, dtype, shape}", t)
            val name = plain(o.opt("name")) as? String ?: wrong("$path[].name", "a string", o.opt("name"))
            val dtype = plain(o.opt("dtype")) as? String ?: wrong("$path[].dtype", "a string", o.opt("dtype"))
            val shape = items("$path[].shape", plain(o.opt("shape")), "a list").map { d -> integer(d) ?: d }
            TensorSpec(name, dtype, shape)
        }
    }

    /** The files map: relative path -> {sha256, bytes}, in manifest order. */
    fun fileEntries(path: String): Map<String, FileEntry> {
        val v = lookup(path)
        val o = v as? JSONObject ?: wrong(path, "an object", v)
        val out = LinkedHashMap<String, FileEntry>()
        val keys = o.keys()
        while (keys.hasNext()) {
            val k = keys.next()
            val e = plain(o.get(k)) as? JSONObject ?: wrong("$path.$k", "{sha256, bytes}", o.get(k))
            val sha = plain(e.opt("sha256")) as? String ?: wrong("$path.$k.sha256", "a string", e.opt("sha256"))
            val bytes = integer(e.opt("bytes")) ?: wrong("$path.$k.bytes", "an integer", e.opt("bytes"))
            out[k] = FileEntry(sha, bytes)
        }
        return out
    }

    // ---------------------------------------------------------------- what the apps read
    val schemaVersion: Int get() = int("schema_version")
    val name: String get() = string("name")
    val target: String get() = string("target")
    val artifact: String get() = string("artifact")
    val tokenizer: String get() = string("tokenizer")
    val bits: Int get() = int("bits")
    val maxContext: Int get() = int("max_context")
    val vocabSize: Int get() = int("vocab_size")
    val bosId: Int get() = int("bos_id")
    val eosIds: List<Int> get() = intList("eos_ids")
    val modelVocabSize: Int get() = int("model.vocab_size")
    val modelDim: Int get() = int("model.dim")
    val modelLayers: Int get() = int("model.n_layers")
    val modelApplied: Int get() = int("model.n_applied")
    val layerSharing: String get() = string("model.layer_sharing")
    val inputs: List<TensorSpec> get() = tensors("io.inputs")
    val outputs: List<TensorSpec> get() = tensors("io.outputs")
    val files: Map<String, FileEntry> get() = fileEntries("files")
    /** null when the export ran with --no-parity. */
    val parityPassed: Boolean? get() = optBool("parity.passed")
}

/** What a bundle check found: errors stop loading, warnings are shown. */
class BundleReport(val errors: List<String>, val warnings: List<String>) {
    val ok: Boolean get() = errors.isEmpty()
}

object BundleValidator {
    /**
     * Checks a bundle folder against its manifest for one of `targets`: schema version, target,
     * artifact and tokenizer recorded in `files`, every file of `files` present with the recorded
     * size (and sha256 when `checkHashes`): the runtimes read more than the artifact (tokenizer.json,
     * genai_config.json, external weights), ids in range, vocab sizes consistent. Every name and
     * number comes from the manifest.
     */
    fun validate(bundleDir: File, manifest: Manifest, targets: List<String>, checkHashes: Boolean = false): BundleReport {
        val errors = ArrayList<String>()
        val warnings = ArrayList<String>()
        fun check(block: () -> Unit) {
            try { block() } catch (e: ManifestException) { errors.add(e.message ?: e.toString()) }
        }
        check {
            if (manifest.schemaVersion != Manifest.SCHEMA_VERSION) {
                errors.add("manifest schema_version ${manifest.schemaVersion} is not ${Manifest.SCHEMA_VERSION}; use a demo app matching the exporter version")
            }
        }
        check {
            if (manifest.target !in targets) {
                errors.add("bundle target is '${manifest.target}', this app runs ${targets.joinToString(" or ")} bundles (export with " +
                    targets.joinToString(" or ") { "--target $it" } + ")")
            }
        }
        var files: Map<String, FileEntry> = emptyMap()
        check { files = manifest.files }
        val checked = HashSet<String>()
        check { checkFile(bundleDir, manifest.artifact, files, checkHashes, errors, checked) }
        check { checkFile(bundleDir, manifest.tokenizer, files, checkHashes, errors, checked) }
        for (name in files.keys) {
            if (name in checked) continue
            checkFile(bundleDir, name, files, checkHashes, errors, checked)
        }
        check {
            val vocab = manifest.vocabSize
            if (vocab < 1) errors.add("vocab_size $vocab must be positive")
            if (manifest.modelVocabSize != vocab) errors.add("vocab_size ${vocab} differs from model.vocab_size ${manifest.modelVocabSize}")
            val bos = manifest.bosId
            if (bos < 0 || bos >= vocab) errors.add("bos_id $bos is outside the vocabulary 0..${vocab - 1}")
            val eos = manifest.eosIds
            if (eos.isEmpty()) errors.add("eos_ids is empty; generation could never stop on its own")
            for (e in eos) if (e < 0 || e >= vocab) errors.add("eos id $e is outside the vocabulary 0..${vocab - 1}")
        }
        check { if (manifest.maxContext < 2) errors.add("max_context ${manifest.maxContext} must be at least 2") }
        check {
            val passed = manifest.parityPassed
            if (passed == null) warnings.add("exported with --no-parity: outputs were not checked against PyTorch")
            else if (!passed) warnings.add("this bundle FAILED its parity check at export (see parity.md in the bundle)")
        }
        return BundleReport(errors, warnings)
    }

    private fun checkFile(dir: File, rel: String, files: Map<String, FileEntry>, hashes: Boolean, errors: MutableList<String>,
                          checked: MutableSet<String>) {
        if (rel.length == 0 || rel.startsWith("/") || rel.split('/').contains("..")) {
            errors.add("manifest names an unsafe path '$rel'"); return
        }
        val f = File(dir, rel)
        if (!f.exists()) { errors.add("$rel is missing from the bundle folder ${dir.path}"); return }
        // A directory artifact (.mlpackage) is recorded file by file under "<dir>/...".
        val entries = if (f.isDirectory) files.filterKeys { it.startsWith("$rel/") } else files.filterKeys { it == rel }
        if (entries.isEmpty()) { errors.add("$rel has no entry in manifest files"); return }
        for ((name, entry) in entries) {
            checked.add(name)
            if (name.startsWith("/") || name.split('/').contains("..")) { errors.add("manifest names an unsafe path '$name'"); continue }
            val g = File(dir, name)
            if (!g.isFile) { errors.add("$name is missing from the bundle"); continue }
            if (g.length() != entry.bytes) {
                errors.add("$name is ${g.length()} bytes, the manifest recorded ${entry.bytes} (incomplete copy? push the bundle again)")
            } else if (hashes && sha256(g) != entry.sha256) {
                errors.add("$name sha256 differs from the manifest (corrupted copy? push the bundle again)")
            }
        }
    }

    fun sha256(f: File): String {
        val md = MessageDigest.getInstance("SHA-256")
        f.inputStream().use { input ->
            val buf = ByteArray(1 shl 16)
            while (true) {
                val n = input.read(buf)
                if (n < 0) break
                md.update(buf, 0, n)
            }
        }
        val sb = StringBuilder()
        for (b in md.digest()) {
            val v = b.toInt() and 0xFF
            sb.append("0123456789abcdef"[v ushr 4]).append("0123456789abcdef"[v and 15])
        }
        return sb.toString()
    }
}
