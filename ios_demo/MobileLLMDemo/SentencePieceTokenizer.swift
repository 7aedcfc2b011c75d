import Foundation

// SentencePiece BPE tokenizer reading tokenizer.model (a protobuf ModelProto), in plain Swift with
// no dependencies. A port of the Android demo's Kotlin tokenizer
// (android_demo/app/src/main/java/org/mobilellm/demo/core/SentencePiece.kt), which
// tests/test_demo_apps.py checks against the Python `sentencepiece` package on real text; keep the
// two in step.
//
// Encoding: normalize (NFKC, whitespace -> ' ', collapse runs, dummy prefix, ' ' -> U+2581), split
// into characters (user-defined pieces first), repeatedly merge the adjacent pair whose concatenation
// is a piece with the highest score (leftmost on ties), map symbols to ids with <0xNN> byte fallback.
// Decoding: join pieces, U+2581 -> ' ', byte pieces -> UTF-8 bytes, drop control pieces, drop the
// dummy-prefix space at the start of the text.
// The model's precompiled nmt_nfkc charsmap is reproduced as Unicode NFKC plus sentencepiece's NMT
// rules (control characters removed, other spaces -> " "); exotic code points where the charsmap's
// Unicode version differs may tokenize differently, still into valid ids.

struct ProtoReader {
    let buf: [UInt8]
    var pos: Int
    let end: Int

    init(_ buf: [UInt8], from: Int = 0, to: Int? = nil) { self.buf = buf; pos = from; end = to ?? buf.count }

    var atEnd: Bool { pos >= end }

    mutating func varint() throws -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard pos < end else { throw DemoError.tokenizer("tokenizer.model: truncated varint") }
            let b = buf[pos]; pos += 1
            result |= UInt64(b & 0x7F) << shift
            if b & 0x80 == 0 { return result }
            shift += 7
            guard shift < 64 else { throw DemoError.tokenizer("tokenizer.model: varint too long") }
        }
    }

    mutating func fixed32() throws -> UInt32 {
        guard pos + 4 <= end else { throw DemoError.tokenizer("tokenizer.model: truncated fixed32") }
        var v: UInt32 = 0
        for k in 0..<4 { v |= UInt32(buf[pos + k]) << (8 * UInt32(k)) }
        pos += 4
        return v
    }

    /// (start, length) of a length-delimited field; skips over it.
    mutating func lengthDelimited() throws -> Range<Int> {
        let len = Int(try varint())
        guard len >= 0, pos + len <= end else { throw DemoError.tokenizer("tokenizer.model: truncated field") }
        let r = pos..<(pos + len)
        pos += len
        return r
    }

    func sub(_ r: Range<Int>) -> ProtoReader { ProtoReader(buf, from: r.lowerBound, to: r.upperBound) }

    func string(_ r: Range<Int>) -> String { String(decoding: buf[r], as: UTF8.self) }

    mutating func skip(_ wire: UInt64) throws {
        switch wire {
        case 0: _ = try varint()
        case 1:
            guard pos + 8 <= end else { throw DemoError.tokenizer("tokenizer.model: truncated fixed64") }
            pos += 8
        case 2: _ = try lengthDelimited()
        case 5: _ = try fixed32()
        default: throw DemoError.tokenizer("tokenizer.model: unsupported protobuf wire type \(wire)")
        }
    }
}

enum PieceType: Int {
    case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6
}

struct Piece {
    let piece: String
    let score: Float
    let type: PieceType
}

struct SentencePieceModel {
    var pieces: [Piece] = []
    var modelType = 1 // 1 unigram, 2 BPE
    var byteFallback = false
    var unkId = 0
    var bosId = 1
    var eosId = 2
    var addDummyPrefix = true
    var removeExtraWhitespaces = true
    var escapeWhitespaces = true
    var treatWhitespaceAsSuffix = false
    var normalizerName = ""

    static func parse(_ data: Data) throws -> SentencePieceModel {
        var m = SentencePieceModel()
        var r = ProtoReader([UInt8](data))
        while !r.atEnd {
            let tag = try r.varint()
            let field = tag >> 3, wire = tag & 7
            if field == 1 && wire == 2 {
                let pieceRange = try r.lengthDelimited()
                var pr = r.sub(pieceRange)
                var text = "", score: Float = 0, type = PieceType.normal
                while !pr.atEnd {
                    let t = try pr.varint()
                    let f = t >> 3, w = t & 7
                    if f == 1 && w == 2 {
                        let range = try pr.lengthDelimited()
                        text = pr.string(range)
                    } else if f == 2 && w == 5 {
                        let bits = try pr.fixed32()
                        score = Float(bitPattern: bits)
                    } else if f == 3 && w == 0 {
                        let raw = try pr.varint()
                        type = PieceType(rawValue: Int(raw)) ?? .normal
                    } else {
                        try pr.skip(w)
                    }
                }
                m.pieces.append(Piece(piece: text, score: score, type: type))
            } else if field == 2 && wire == 2 { // TrainerSpec
                let trainerRange = try r.lengthDelimited()
                var tr = r.sub(trainerRange)
                while !tr.atEnd {
                    let t = try tr.varint()
                    let f = t >> 3, w = t & 7
                    guard w == 0 else { try tr.skip(w); continue }
                    let raw = try tr.varint()
                    let v = Int64(bitPattern: raw)
                    switch f {
                    case 3: m.modelType = Int(v)
                    case 24: m.treatWhitespaceAsSuffix = v != 0
                    case 35: m.byteFallback = v != 0
                    case 40: m.unkId = Int(Int32(truncatingIfNeeded: v))
                    case 41: m.bosId = Int(Int32(truncatingIfNeeded: v))
                    case 42: m.eosId = Int(Int32(truncatingIfNeeded: v))
                    default: break
                    }
                }
            } else if field == 3 && wire == 2 { // NormalizerSpec
                let normalizerRange = try r.lengthDelimited()
                var nr = r.sub(normalizerRange)
                while !nr.atEnd {
                    let t = try nr.varint()
                    let f = t >> 3, w = t & 7
                    if f == 1 && w == 2 {
                        let range = try nr.lengthDelimited()
                        m.normalizerName = nr.string(range)
                    } else if w == 0 && (3...5).contains(f) {
                        let on = try nr.varint() != 0
                        if f == 3 { m.addDummyPrefix = on } else if f == 4 { m.removeExtraWhitespaces = on } else { m.escapeWhitespaces = on }
                    } else {
                        try nr.skip(w)
                    }
                }
            } else {
                try r.skip(wire)
            }
        }
        guard !m.pieces.isEmpty else { throw DemoError.tokenizer("tokenizer.model has no pieces (not a SentencePiece model?)") }
        return m
    }
}

final class SentencePieceTokenizer: @unchecked Sendable { // immutable after init except the unused-piece cache; used from one task at a time
    static let space: Character = "\u{2581}"
    static let unkSurface = " \u{2047} "

    let model: SentencePieceModel
    private var pieceToId: [String: Int] = [:]    // normal, user-defined, unused (mergeable)
    private var reservedToId: [String: Int] = [:] // control, unknown, byte
    private var byteToId = [Int](repeating: -1, count: 256)
    private var userDefined: [String] = []
    private var unusedSplit: [String: (String, String)] = [:]

    var vocabSize: Int { model.pieces.count }
    var bosId: Int { model.bosId }
    var eosId: Int { model.eosId }

    init(model: SentencePieceModel) throws {
        guard model.modelType == 2 else {
            throw DemoError.tokenizer("tokenizer.model is not a BPE model (model_type \(model.modelType)); MobileLLM uses SentencePiece BPE")
        }
        self.model = model
        for (id, p) in model.pieces.enumerated() {
            switch p.type {
            case .normal, .userDefined, .unused: pieceToId[p.piece] = id
            default: reservedToId[p.piece] = id
            }
            if p.type == .userDefined { userDefined.append(p.piece) }
            if p.type == .byte, let b = Self.bytePieceValue(p.piece) { byteToId[b] = id }
        }
        userDefined.sort { $0.count > $1.count } // longest match first
    }

    convenience init(contentsOf url: URL) throws {
        try self.init(model: SentencePieceModel.parse(Data(contentsOf: url)))
    }

    static func bytePieceValue(_ p: String) -> Int? {
        guard p.count == 6, p.hasPrefix("<0x"), p.hasSuffix(">") else { return nil }
        return Int(p.dropFirst(3).prefix(2), radix: 16)
    }

    func pieceId(_ piece: String) -> Int? { reservedToId[piece] ?? pieceToId[piece] }

    func normalize(_ text: String) -> String {
        let nfkc = (model.normalizerName.isEmpty || model.normalizerName == "identity") ? text : text.precomposedStringWithCompatibilityMapping
        let nmt = model.normalizerName.hasPrefix("nmt")
        var s = ""
        for scalar in nfkc.unicodeScalars {
            let c = scalar.value
            if nmt && Self.nmtRemoved(c) { continue }
            if nmt && Self.nmtSpace(c) { s.append(" ") } else { s.unicodeScalars.append(scalar) }
        }
        if model.removeExtraWhitespaces {
            var out = ""
            var prevSpace = false
            for ch in s.trimmingCharacters(in: CharacterSet(charactersIn: " ")).unicodeScalars {
                if ch == " " { if !prevSpace { out.unicodeScalars.append(ch) }; prevSpace = true }
                else { out.unicodeScalars.append(ch); prevSpace = false }
            }
            s = out
        }
        if s.isEmpty { return s }
        if model.addDummyPrefix { s = model.treatWhitespaceAsSuffix ? s + " " : " " + s }
        if model.escapeWhitespaces { s = s.replacingOccurrences(of: " ", with: String(Self.space)) }
        return s
    }

    // sentencepiece's nmt_nfkc rules on top of NFKC: control characters removed, other spaces -> " ".
    static func nmtRemoved(_ c: UInt32) -> Bool {
        (0x01...0x08).contains(c) || c == 0x0B || (0x0E...0x1F).contains(c) || c == 0x7F || c == 0x8F || c == 0x9F
    }

    static func nmtSpace(_ c: UInt32) -> Bool {
        [0x09, 0x0A, 0x0C, 0x0D, 0x1680, 0x200B, 0x200C, 0x200E, 0x200F, 0x2028, 0x2029, 0x2581, 0xFEFF, 0xFFFD].contains(c)
    }

    /// Token ids of `text`; `addBos` prepends the model's BOS id.
    func encode(_ text: String, addBos: Bool = false) -> [Int] {
        let norm = normalize(text)
        var out: [Int] = addBos ? [model.bosId] : []
        if norm.isEmpty { return out }

        // Initial symbols: user-defined pieces (frozen), else single Unicode scalars.
        var syms: [String] = []
        var frozen: [Bool] = []
        let scalars = Array(norm.unicodeScalars)
        var i = 0
        while i < scalars.count {
            var matched: String? = nil
            for u in userDefined {
                let us = Array(u.unicodeScalars)
                if i + us.count <= scalars.count && Array(scalars[i..<(i + us.count)]) == us { matched = u; break }
            }
            if let m = matched {
                syms.append(m); frozen.append(true); i += m.unicodeScalars.count
            } else {
                syms.append(String(scalars[i])); frozen.append(false); i += 1
            }
        }

        // Greedy BPE: merge the best-scoring adjacent pair (leftmost on ties) until none applies.
        while true {
            var bestIdx = -1
            var bestScore = -Float.infinity
            var bestId = -1
            if syms.count >= 2 {
                for k in 0..<(syms.count - 1) {
                    if frozen[k] || frozen[k + 1] { continue }
                    guard let id = pieceToId[syms[k] + syms[k + 1]] else { continue }
                    let score = model.pieces[id].score
                    if bestIdx < 0 || score > bestScore { bestIdx = k; bestScore = score; bestId = id }
                }
            }
            if bestIdx < 0 { break }
            let merged = syms[bestIdx] + syms[bestIdx + 1]
            if model.pieces[bestId].type == .unused { unusedSplit[merged] = (syms[bestIdx], syms[bestIdx + 1]) }
            syms[bestIdx] = merged
            syms.remove(at: bestIdx + 1)
            frozen.remove(at: bestIdx + 1)
        }

        var prevUnk = false
        for sym in syms {
            for piece in resegment(sym) {
                if let id = pieceId(piece), model.pieces[id].type != .unknown {
                    out.append(id); prevUnk = false
                } else if model.byteFallback {
                    for b in Array(piece.utf8) where byteToId[Int(b)] >= 0 { out.append(byteToId[Int(b)]) }
                    prevUnk = false
                } else {
                    if !prevUnk { out.append(model.unkId) } // consecutive unknowns collapse into one <unk>
                    prevUnk = true
                }
            }
        }
        return out
    }

    private func resegment(_ sym: String) -> [String] {
        guard let id = pieceToId[sym], model.pieces[id].type == .unused, let parts = unusedSplit[sym] else { return [sym] }
        return resegment(parts.0) + resegment(parts.1)
    }

    /// Text of `ids`; `startOfText: false` keeps the leading space when continuing earlier text.
    func decode(_ ids: [Int], startOfText: Bool = true) -> String {
        var out = ""
        var bytes: [UInt8] = []
        var first = startOfText
        func flushBytes() {
            guard !bytes.isEmpty else { return }
            var text = String(decoding: bytes, as: UTF8.self) // invalid sequences become U+FFFD
            if first && text.hasPrefix(" ") && model.addDummyPrefix { text.removeFirst() }
            if !text.isEmpty { first = false }
            out += text
            bytes.removeAll()
        }
        for id in ids where id >= 0 && id < model.pieces.count {
            let p = model.pieces[id]
            switch p.type {
            case .control: continue
            case .byte: if let b = Self.bytePieceValue(p.piece) { bytes.append(UInt8(b)) }
            case .unknown: flushBytes(); out += Self.unkSurface; first = false
            default:
                flushBytes()
                var text = p.piece.replacingOccurrences(of: String(Self.space), with: " ")
                if first && text.hasPrefix(" ") && model.addDummyPrefix && !model.treatWhitespaceAsSuffix { text.removeFirst() }
                if !text.isEmpty { first = false }
                out += text
            }
        }
        flushBytes()
        return out
    }
}

/// Turns generated ids into text deltas, holding back byte pieces until they form whole UTF-8 characters.
final class StreamingDecoder: @unchecked Sendable {
    private let tok: SentencePieceTokenizer
    private let startOfText: Bool
    private var ids: [Int] = []
    private var emitted = ""

    init(_ tok: SentencePieceTokenizer, startOfText: Bool) { self.tok = tok; self.startOfText = startOfText }

    func push(_ id: Int) -> String {
        ids.append(id)
        let text = tok.decode(ids, startOfText: startOfText)
        if text.hasSuffix("\u{FFFD}") && pendingBytes() { return "" }
        // Compare Unicode scalars, not Characters: a combining mark arriving later changes the last
        // Character of the emitted text but only appends scalars.
        let now = Array(text.unicodeScalars), before = Array(emitted.unicodeScalars)
        var delta = ""
        if now.count >= before.count && Array(now[0..<before.count]) == before {
            delta.unicodeScalars.append(contentsOf: now[before.count...])
        } else {
            delta = text
        }
        emitted = text
        return delta
    }

    private func pendingBytes() -> Bool {
        var trailing: [Int] = []
        for id in ids.reversed() {
            guard tok.model.pieces[id].type == .byte, let b = SentencePieceTokenizer.bytePieceValue(tok.model.pieces[id].piece) else { break }
            trailing.insert(b, at: 0)
        }
        guard !trailing.isEmpty else { return false }
        var lead = -1, count = 0
        for b in trailing { if b & 0xC0 != 0x80 { lead = b; count = 1 } else { count += 1 } }
        guard lead >= 0 else { return false }
        let need = lead & 0xE0 == 0xC0 ? 2 : lead & 0xF0 == 0xE0 ? 3 : lead & 0xF8 == 0xF0 ? 4 : 1
        return count < need
    }
}
