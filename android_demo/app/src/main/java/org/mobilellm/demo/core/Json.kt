package org.mobilellm.demo.core

// Platform-free code: no android.* imports here. Compiled and tested on a plain JVM by
// tests/test_demo_apps.py (kotlinc), and written to compile with Kotlin 1.3 up to 2.x.

/** Thrown for malformed JSON, with the character offset of the problem. */
class JsonException(message: String) : Exception(message)

/**
 * A small, self-contained JSON parser (RFC 8259). Objects become LinkedHashMap<String, Any?>,
 * arrays List<Any?>, integers without fraction/exponent Long, other numbers Double, plus
 * String, Boolean and null. No org.json (which is an Android-only stub on the JVM).
 */
class Json private constructor(private val s: String) {
    private var i = 0

    companion object {
        fun parse(text: String): Any? {
            val p = Json(text)
            p.skipWs()
            val v = p.value(0)
            p.skipWs()
            if (p.i != p.s.length) p.fail("unexpected trailing characters")
            return v
        }

        private const val MAX_DEPTH = 256
    }

    private fun fail(msg: String): Nothing = throw JsonException("JSON: $msg at offset $i")

    private fun skipWs() {
        while (i < s.length) {
            val c = s[i]
            if (c == ' ' || c == '\n' || c == '\r' || c == '\t') i++ else break
        }
    }

    private fun value(depth: Int): Any? {
        if (depth > MAX_DEPTH) fail("nesting too deep")
        if (i >= s.length) fail("unexpected end of input")
        val c = s[i]
        return when {
            c == '{' -> obj(depth)
            c == '[' -> arr(depth)
            c == '"' -> str()
            c == 't' -> literal("true", true)
            c == 'f' -> literal("false", false)
            c == 'n' -> literal("null", null)
            c == '-' || (c in '0'..'9') -> num()
            else -> fail("unexpected character '$c'")
        }
    }

    private fun literal(word: String, v: Any?): Any? {
        if (!s.startsWith(word, i)) fail("invalid literal")
        i += word.length
        return v
    }

    private fun obj(depth: Int): Map<String, Any?> {
        val out = LinkedHashMap<String, Any?>()
        i++ // {
        skipWs()
        if (i < s.length && s[i] == '}') { i++; return out }
        while (true) {
            skipWs()
            if (i >= s.length || s[i] != '"') fail("expected a string key")
            val k = str()
            skipWs()
            if (i >= s.length || s[i] != ':') fail("expected ':'")
            i++
            skipWs()
            out[k] = value(depth + 1)
            skipWs()
            if (i >= s.length) fail("unterminated object")
            if (s[i] == ',') { i++; continue }
            if (s[i] == '}') { i++; return out }
            fail("expected ',' or '}'")
        }
    }

    private fun arr(depth: Int): List<Any?> {
        val out = ArrayList<Any?>()
        i++ // [
        skipWs()
        if (i < s.length && s[i] == ']') { i++; return out }
        while (true) {
            skipWs()
            out.add(value(depth + 1))
            skipWs()
            if (i >= s.length) fail("unterminated array")
            if (s[i] == ',') { i++; continue }
            if (s[i] == ']') { i++; return out }
            fail("expected ',' or ']'")
        }
    }

    private fun hex(c: Char): Int {
        val d = "0123456789abcdef".indexOf(c)
        if (d >= 0) return d
        val u = "0123456789ABCDEF".indexOf(c)
        if (u >= 0) return u
        fail("invalid hex digit '$c'")
    }

    private fun str(): String {
        i++ // opening quote
        val sb = StringBuilder()
        while (true) {
            if (i >= s.length) fail("unterminated string")
            val c = s[i++]
            when {
                c == '"' -> return sb.toString()
                c == '\\' -> {
                    if (i >= s.length) fail("unterminated escape")
                    val e = s[i++]
                    when (e) {
                        '"' -> sb.append('"')
                        '\\' -> sb.append('\\')
                        '/' -> sb.append('/')
                        'b' -> sb.append('\b')
                        'f' -> sb.append('\u000C')
                        'n' -> sb.append('\n')
                        'r' -> sb.append('\r')
                        't' -> sb.append('\t')
                        'u' -> {
                            if (i + 4 > s.length) fail("short \\u escape")
                            var code = 0
                            for (k in 0 until 4) code = code * 16 + hex(s[i + k])
                            i += 4
                            sb.append(code.toChar()) // surrogate pairs arrive as two escapes
                        }
                        else -> fail("invalid escape '\\$e'")
                    }
                }
                c < ' ' -> fail("control character in string")
                else -> sb.append(c)
            }
        }
    }

    private fun num(): Any {
        val start = i
        if (s[i] == '-') i++
        if (i >= s.length) fail("invalid number")
        if (s[i] == '0') i++ else if (s[i] in '1'..'9') { while (i < s.length && s[i] in '0'..'9') i++ } else fail("invalid number")
        var integral = true
        if (i < s.length && s[i] == '.') {
            integral = false
            i++
            if (i >= s.length || s[i] !in '0'..'9') fail("invalid fraction")
            while (i < s.length && s[i] in '0'..'9') i++
        }
        if (i < s.length && (s[i] == 'e' || s[i] == 'E')) {
            integral = false
            i++
            if (i < s.length && (s[i] == '+' || s[i] == '-')) i++
            if (i >= s.length || s[i] !in '0'..'9') fail("invalid exponent")
            while (i < s.length && s[i] in '0'..'9') i++
        }
        val text = s.substring(start, i)
        if (integral) {
            val l = text.toLongOrNull()
            if (l != null) return l
        }
        return text.toDouble()
    }
}
