package org.mobilellm.demo.core

import java.text.Normalizer

// Platform-free (no android.* imports): a SentencePiece BPE tokenizer that reads tokenizer.model.
// The iOS app's Swift tokenizer (ios_demo/MobileLLMDemo/SentencePieceTokenizer.swift) is a
// line-by-line port of this file; the Kotlin one is checked here against the Python
// `sentencepiece` package on real text.

class TokenizerException(message: String) : Exception(message)

/** Minimal protobuf wire-format reader (varint, fixed32, fixed64, length-delimited). */
class ProtoReader(private val buf: ByteArray, private var pos: Int = 0, private val end: Int = buf.size) {
    fun atEnd(): Boolean = pos >= end

    fun varint(): Long {
        var shift = 0
        var result = 0L
        while (true) {
            if (pos >= end) throw TokenizerException("protobuf: truncated varint")
            val b = buf[pos++].toInt() and 0xFF
            result = result or ((b and 0x7F).toLong() shl shift)
            if (b and 0x80 == 0) return result
            shift += 7
            if (shift >= 64) throw TokenizerException("protobuf: varint too long")
        }
    }

    fun fixed32(): Int {
        if (pos + 4 > end) throw TokenizerException("protobuf: truncated fixed32")
        var v = 0
        for (k in 0 until 4) v = v or ((buf[pos + k].toInt() and 0xFF) shl (8 * k))
        pos += 4
        return v
    }

    /** Returns (start, length) of a length-delimited field and skips over it. */
    fun lengthDelimited(): IntArray {
        val len = varint()
        if (len < 0 || pos + len > end) throw TokenizerException("protobuf: truncated field")
        val start = pos
        pos += len.toInt()
        return intArrayOf(start, len.toInt())
    }

    fun sub(range: IntArray): ProtoReader = ProtoReader(buf, range[0], range[0] + range[1])

    fun string(range: IntArray): String = String(buf, range[0], range[1], Charsets.UTF_8)

    fun skip(wireType: Int) {
        when (wireType) {
            0 -> varint()
            1 -> { if (pos + 8 > end) throw TokenizerException("protobuf: truncated fixed64"); pos += 8 }
            2 -> lengthDelimited()
            5 -> fixed32()
            else -> throw TokenizerException("protobuf: unsupported wire type $wireType")
        }
    }
}

/** SentencePiece piece types (sentencepiece_model.proto). */
object PieceType {
    const val NORMAL = 1
    const val UNKNOWN = 2
    const val CONTROL = 3
    const val USER_DEFINED = 4
    const val UNUSED = 5
    const val BYTE = 6
}

class Piece(val piece: String, val score: Float, val type: Int)

/** The parts of ModelProto the tokenizer needs. */
class SentencePieceModel(
    val pieces: List<Piece>,
    val modelType: Int, // 1 unigram, 2 BPE, 3 word, 4 char
    val byteFallback: Boolean,
    val unkId: Int,
    val bosId: Int,
    val eosId: Int,
    val padId: Int,
    val addDummyPrefix: Boolean,
    val removeExtraWhitespaces: Boolean,
    val escapeWhitespaces: Boolean,
    val treatWhitespaceAsSuffix: Boolean,
    val normalizerName: String
) {
    companion object {
        const val MODEL_BPE = 2

        fun parse(bytes: ByteArray): SentencePieceModel {
            val pieces = ArrayList<Piece>()
            var modelType = 1
            var byteFallback = false
            var unkId = 0
            var bosId = 1
            var eosId = 2
            var padId = -1
            var suffix = false
            var addDummyPrefix = true
            var removeExtra = true
            var escape = true
            var normalizerName = ""
            val r = ProtoReader(bytes)
            while (!r.atEnd()) {
                val tag = r.varint()
                val field = (tag ushr 3).toInt()
                val wire = (tag and 7L).toInt()
                if (field == 1 && wire == 2) {
                    val pr = r.sub(r.lengthDelimited())
                    var text = ""
                    var score = 0f
                    var type = PieceType.NORMAL
                    while (!pr.atEnd()) {
                        val t = pr.varint()
                        val f = (t ushr 3).toInt()
                        val w = (t and 7L).toInt()
                        when {
                            f == 1 && w == 2 -> text = pr.string(pr.lengthDelimited())
                            f == 2 && w == 5 -> score = java.lang.Float.intBitsToFloat(pr.fixed32())
                            f == 3 && w == 0 -> type = pr.varint().toInt()
                            else -> pr.skip(w)
                        }
                    }
                    pieces.add(Piece(text, score, type))
                } else if (field == 2 && wire == 2) { // TrainerSpec
                    val tr = r.sub(r.lengthDelimited())
                    while (!tr.atEnd()) {
                        val t = tr.varint()
                        val f = (t ushr 3).toInt()
                        val w = (t and 7L).toInt()
                        if (w != 0) { tr.skip(w); continue }
                        val v = tr.varint()
                        when (f) {
                            3 -> modelType = v.toInt()
                            24 -> suffix = v != 0L
                            35 -> byteFallback = v != 0L
                            40 -> unkId = v.toInt()
                            41 -> bosId = v.toInt()
                            42 -> eosId = v.toInt()
                            43 -> padId = v.toInt()
                        }
                    }
                } else if (field == 3 && wire == 2) { // NormalizerSpec
                    val nr = r.sub(r.lengthDelimited())
                    while (!nr.atEnd()) {
                        val t = nr.varint()
                        val f = (t ushr 3).toInt()
                        val w = (t and 7L).toInt()
                        when {
                            f == 1 && w == 2 -> normalizerName = nr.string(nr.lengthDelimited())
                            f == 3 && w == 0 -> addDummyPrefix = nr.varint() != 0L
                            f == 4 && w == 0 -> removeExtra = nr.varint() != 0L
                            f == 5 && w == 0 -> escape = nr.varint() != 0L
                            else -> nr.skip(w)
                        }
                    }
                } else {
                    r.skip(wire)
                }
            }
            if (pieces.isEmpty()) throw TokenizerException("tokenizer.model has no pieces (not a SentencePiece model?)")
            return SentencePieceModel(pieces, modelType, byteFallback, unkId, bosId, eosId, padId,
                addDummyPrefix, removeExtra, escape, suffix, normalizerName)
        }
    }
}

/**
 * SentencePiece BPE encode/decode, following sentencepiece's bpe_model.cc and
 * sentencepiece_processor.cc: normalize (NFKC, collapse whitespace, dummy prefix, ' ' -> U+2581),
 * split into characters (user-defined pieces first), merge the adjacent pair whose concatenation is
 * a piece with the highest score (leftmost on ties) until none is left, then map symbols to ids,
 * falling back to <0xNN> byte pieces (or <unk>) for symbols that are not pieces.
 *
 * Normalization note: the model's precompiled nmt_nfkc charsmap is reproduced as java.text.Normalizer
 * NFKC followed by sentencepiece's NMT rules (control characters removed, other spaces -> ' ');
 * identical on the test texts, it may differ on exotic code points where the charsmap deviates from
 * the JDK's Unicode version (the ids are still valid, only segmented differently).
 */
class SentencePieceTokenizer(val model: SentencePieceModel) {
    private val pieceToId = HashMap<String, Int>()   // NORMAL, USER_DEFINED, UNUSED (mergeable)
    private val reservedToId = HashMap<String, Int>() // CONTROL, UNKNOWN, BYTE
    private val byteToId = IntArray(256) { -1 }
    private val userDefined = ArrayList<String>()
    private val unusedSplit = HashMap<String, Array<String>>()

    val vocabSize: Int get() = model.pieces.size
    val bosId: Int get() = model.bosId
    val eosId: Int get() = model.eosId

    init {
        if (model.modelType != SentencePieceModel.MODEL_BPE) {
            throw TokenizerException("tokenizer.model is not a BPE model (model_type ${model.modelType}); this demo implements SentencePiece BPE, which MobileLLM uses")
        }
        for ((id, p) in model.pieces.withIndex()) {
            when (p.type) {
                PieceType.NORMAL, PieceType.USER_DEFINED, PieceType.UNUSED -> pieceToId[p.piece] = id
                else -> reservedToId[p.piece] = id
            }
            if (p.type == PieceType.USER_DEFINED) userDefined.add(p.piece)
            if (p.type == PieceType.BYTE) {
                val b = parseBytePiece(p.piece)
                if (b >= 0) byteToId[b] = id
            }
        }
        userDefined.sortWith(Comparator { a, b -> b.length - a.length }) // longest match first
    }

    private fun parseBytePiece(p: String): Int {
        if (p.length != 6 || !p.startsWith("<0x") || !p.endsWith(">")) return -1
        val v = p.substring(3, 5).toIntOrNull(16) ?: return -1
        return v
    }

    fun idToPiece(id: Int): String = model.pieces[id].piece

    fun pieceId(piece: String): Int? = reservedToId[piece] ?: pieceToId[piece]

    /** The normalized string the BPE runs on (with U+2581 for spaces and the dummy prefix). */
    fun normalize(text: String): String {
        val nfkc = if (model.normalizerName.length == 0 || model.normalizerName == "identity") text
        else Normalizer.normalize(text, Normalizer.Form.NFKC)
        val nmt = model.normalizerName.startsWith("nmt")
        val sb = StringBuilder(nfkc.length + 1)
        for (c in nfkc) {
            val code = c - '\u0000'
            if (nmt && isNmtRemoved(code)) continue
            sb.append(if (nmt && isNmtSpace(code)) ' ' else c)
        }
        var s = sb.toString()
        if (model.removeExtraWhitespaces) {
            s = s.trim(' ')
            val out = StringBuilder(s.length)
            var prevSpace = false
            for (c in s) {
                if (c == ' ') { if (!prevSpace) out.append(c); prevSpace = true } else { out.append(c); prevSpace = false }
            }
            s = out.toString()
        }
        if (s.length == 0) return s
        if (model.addDummyPrefix) s = if (model.treatWhitespaceAsSuffix) "$s " else " $s"
        if (model.escapeWhitespaces) s = s.replace(' ', SPACE)
        return s
    }

    // sentencepiece's nmt_nfkc rules on top of NFKC: control characters removed, other spaces -> ' '.
    private fun isNmtRemoved(c: Int): Boolean = (c in 0x01..0x08) || c == 0x0B || (c in 0x0E..0x1F) || c == 0x7F || c == 0x8F || c == 0x9F

    private fun isNmtSpace(c: Int): Boolean = c == 0x09 || c == 0x0A || c == 0x0C || c == 0x0D || c == 0x1680 || c == 0x200B ||
        c == 0x200C || c == 0x200E || c == 0x200F || c == 0x2028 || c == 0x2029 || c == 0x2581 || c == 0xFEFF || c == 0xFFFD

    /** Token ids of `text`; `addBos` prepends the model's BOS id. */
    fun encode(text: String, addBos: Boolean = false): IntArray {
        val norm = normalize(text)
        val out = ArrayList<Int>()
        if (addBos) out.add(model.bosId)
        if (norm.length == 0) return out.toIntArray()

        // Initial symbols: user-defined pieces (frozen), else single code points.
        val syms = ArrayList<String>()
        val frozen = ArrayList<Boolean>()
        var i = 0
        while (i < norm.length) {
            var matched: String? = null
            for (u in userDefined) if (norm.startsWith(u, i)) { matched = u; break }
            if (matched != null) {
                syms.add(matched); frozen.add(true); i += matched.length
            } else {
                val n = Character.charCount(norm.codePointAt(i))
                syms.add(norm.substring(i, i + n)); frozen.add(false); i += n
            }
        }

        // Greedy BPE: merge the best-scoring adjacent pair (leftmost on ties) until none applies.
        while (true) {
            var bestIdx = -1
            var bestScore = Float.NEGATIVE_INFINITY
            var bestId = -1
            for (k in 0 until syms.size - 1) {
                if (frozen[k] || frozen[k + 1]) continue
                val id = pieceToId[syms[k] + syms[k + 1]] ?: continue
                val score = model.pieces[id].score
                if (bestIdx < 0 || score > bestScore) { bestIdx = k; bestScore = score; bestId = id }
            }
            if (bestIdx < 0) break
            val merged = syms[bestIdx] + syms[bestIdx + 1]
            if (model.pieces[bestId].type == PieceType.UNUSED) {
                unusedSplit[merged] = arrayOf(syms[bestIdx], syms[bestIdx + 1])
            }
            syms[bestIdx] = merged
            syms.removeAt(bestIdx + 1)
            frozen.removeAt(bestIdx + 1)
        }

        var prevUnk = false
        for (sym in syms) {
            for (piece in resegment(sym)) {
                val id = pieceId(piece)
                if (id != null && model.pieces[id].type != PieceType.UNKNOWN) {
                    out.add(id); prevUnk = false
                } else if (model.byteFallback) {
                    for (b in piece.toByteArray(Charsets.UTF_8)) {
                        val bid = byteToId[b.toInt() and 0xFF]
                        if (bid < 0) throw TokenizerException("byte fallback piece for byte ${b.toInt() and 0xFF} missing")
                        out.add(bid)
                    }
                    prevUnk = false
                } else {
                    if (!prevUnk) out.add(model.unkId) // consecutive unknowns collapse into one <unk>
                    prevUnk = true
                }
            }
        }
        return out.toIntArray()
    }

    private fun resegment(sym: String): List<String> {
        val id = pieceToId[sym]
        if (id == null || model.pieces[id].type != PieceType.UNUSED) return listOf(sym)
        val parts = unusedSplit[sym] ?: return listOf(sym)
        return resegment(parts[0]) + resegment(parts[1])
    }

    /**
     * Text of `ids`. Control pieces (BOS/EOS) vanish, byte pieces are joined and decoded as UTF-8
     * (invalid sequences become U+FFFD), U+2581 becomes a space, and the dummy-prefix space of the
     * first piece is dropped when `startOfText` (pass false when continuing earlier text).
     */
    fun decode(ids: IntArray, startOfText: Boolean = true): String {
        val sb = StringBuilder()
        val bytes = java.io.ByteArrayOutputStream()
        var first = startOfText
        fun flushBytes() {
            if (bytes.size() > 0) {
                var text = String(bytes.toByteArray(), Charsets.UTF_8)
                if (first && text.startsWith(" ") && model.addDummyPrefix) text = text.substring(1)
                if (text.isNotEmpty()) first = false
                sb.append(text)
                bytes.reset()
            }
        }
        for (id in ids) {
            if (id < 0 || id >= model.pieces.size) throw TokenizerException("token id $id out of range 0..${model.pieces.size - 1}")
            val p = model.pieces[id]
            when (p.type) {
                PieceType.CONTROL -> { }
                PieceType.BYTE -> bytes.write(parseBytePiece(p.piece))
                PieceType.UNKNOWN -> { flushBytes(); sb.append(UNK_SURFACE); first = false }
                else -> {
                    flushBytes()
                    var text = p.piece.replace(SPACE, ' ')
                    if (first && text.startsWith(" ") && model.addDummyPrefix && !model.treatWhitespaceAsSuffix) text = text.substring(1)
                    if (text.isNotEmpty()) first = false
                    sb.append(text)
                }
            }
        }
        flushBytes()
        return sb.toString()
    }

    companion object {
        const val SPACE = '\u2581'
        const val UNK_SURFACE = " \u2047 "

        fun load(file: java.io.File): SentencePieceTokenizer = SentencePieceTokenizer(SentencePieceModel.parse(file.readBytes()))
    }
}

/**
 * Turns a stream of generated ids into text deltas. Holds back byte pieces until they form
 * complete UTF-8 characters, so a multi-byte character split over tokens is never shown as U+FFFD.
 */
class StreamingDecoder(private val tok: SentencePieceTokenizer, private val startOfText: Boolean) {
    private val ids = ArrayList<Int>()
    private var emitted = ""

    /** Adds one id; returns the new text to append (possibly empty). */
    fun push(id: Int): String {
        ids.add(id)
        val text = tok.decode(ids.toIntArray(), startOfText)
        if (text.endsWith("\uFFFD") && pendingBytes()) return ""
        val delta = if (text.startsWith(emitted)) text.substring(emitted.length) else text
        emitted = text
        return delta
    }

    /** True while the trailing byte pieces are a proper prefix of a UTF-8 sequence. */
    private fun pendingBytes(): Boolean {
        var n = 0
        var k = ids.size - 1
        while (k >= 0 && tok.model.pieces[ids[k]].type == PieceType.BYTE) { n++; k-- }
        if (n == 0) return false
        var lead = -1
        var count = 0
        for (j in ids.size - n until ids.size) {
            val b = Integer.parseInt(tok.idToPiece(ids[j]).substring(3, 5), 16)
            if (b and 0xC0 != 0x80) { lead = b; count = 1 } else count++
        }
        val need = when {
            lead < 0 -> return false
            lead and 0xE0 == 0xC0 -> 2
            lead and 0xF0 == 0xE0 -> 3
            lead and 0xF8 == 0xF0 -> 4
            else -> 1
        }
        return count < need
    }
}
