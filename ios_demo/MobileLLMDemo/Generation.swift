import Foundation

// Sampling, stop rules, context budget, the BOS rule, streamed text and tokens/s for the Core ML loop.
// Tokenizing is swift-transformers' (Tokenizers); the stop rule, budget and BOS rule follow the Android
// demo's Kotlin (android_demo/app/src/main/java/org/mobilellm/demo/core/Generation.kt), which is unit-tested.

/// Greedy (temperature <= 0) or temperature sampling with optional top-k.
struct Sampler {
    let temperature: Float
    let topK: Int
    private var rng: SplitMix64

    init(temperature: Float, topK: Int = 0, seed: UInt64 = UInt64(Date().timeIntervalSince1970 * 1000)) {
        self.temperature = temperature
        self.topK = topK
        self.rng = SplitMix64(seed: seed)
    }

    /// Index of the largest logit; the lowest index wins ties; NaN never wins.
    static func argmax(_ logits: [Float]) -> Int {
        var best = 0
        var bestV = -Float.infinity
        for (k, v) in logits.enumerated() where v > bestV { bestV = v; best = k }
        return best
    }

    mutating func sample(_ logits: [Float]) -> Int {
        if temperature <= 0 { return Self.argmax(logits) }
        var candidates = Array(logits.indices)
        if topK > 0 && topK < logits.count {
            candidates = Array(candidates.sorted { logits[$0] > logits[$1] }.prefix(topK))
        }
        let maxLogit = candidates.map { logits[$0] }.max() ?? 0
        let probs = candidates.map { exp(Double((logits[$0] - maxLogit) / temperature)) }
        var r = Double.random(in: 0..<1, using: &rng) * probs.reduce(0, +)
        for (k, id) in candidates.enumerated() {
            r -= probs[k]
            if r <= 0 { return id }
        }
        return candidates[candidates.count - 1]
    }
}

/// Small seeded generator so runs with a fixed seed repeat.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

enum StopReason: String {
    case eos = "end of sequence"
    case contextFull = "context full (max_context)"
    case maxNewTokens = "max new tokens"
    case user = "stopped"
}

/// When to stop: an id from manifest eos_ids, the KV cache (max_context) full, or the token budget.
struct StopRule {
    let eosIds: Set<Int>
    let maxContext: Int
    let maxNewTokens: Int

    func isEos(_ token: Int) -> Bool { eosIds.contains(token) }

    /// `token` was just sampled; `generated` tokens (including it) follow a prompt of `promptTokens`.
    func check(token: Int, promptTokens: Int, generated: Int) -> StopReason? {
        if eosIds.contains(token) { return .eos }
        if generated >= maxNewTokens { return .maxNewTokens }
        // Feeding `token` writes KV position promptTokens + generated - 1, which must be < maxContext.
        if promptTokens + generated > maxContext - 1 { return .contextFull }
        return nil
    }
}

/// Checks a prompt against manifest max_context before running anything.
struct PromptBudget {
    let maxContext: Int
    /// Longest prefill the exported model accepts: tokens [1, S] with S <= max_context - 1.
    var maxPromptTokens: Int { maxContext - 1 }

    func problem(promptTokens: Int) -> String? {
        if promptTokens <= 0 { return "the prompt is empty" }
        if promptTokens > maxPromptTokens {
            return "the prompt is \(promptTokens) tokens but this bundle's context (max_context) is \(maxContext) tokens: shorten the prompt to at most \(maxPromptTokens) tokens, or re-export with a larger --max-seq-len"
        }
        return nil
    }
}

/// MobileLLM is trained with BOS first, and the exporter's parity check feeds manifest bos_id first.
/// swift-transformers applies tokenizer.json's BOS template when encoding; this makes it exactly one
/// BOS either way, so a tokenizer without the template still gives the model what it was trained on.
func withLeadingBos(_ ids: [Int], bosId: Int) -> [Int] {
    ids.first == bosId ? ids : [bosId] + ids
}

/// Text as it is generated, from any tokenizer's decode of a list of ids: re-decodes context + generated
/// ids each step and emits what was added. Decoding with the prompt as context keeps the space that
/// SentencePiece-style tokenizers put before a word (decoding the new ids alone would strip it); text
/// ending in U+FFFD is held back until the next id completes the character (byte-fallback pieces).
final class TextStream {
    private let decode: ([Int]) -> String
    private var ids: [Int]
    private var emitted: [Unicode.Scalar]

    init(context: [Int], decode: @escaping ([Int]) -> String) {
        self.decode = decode
        ids = context
        emitted = Array(decode(context).unicodeScalars)
    }

    /// The text `id` adds ("" while a character is incomplete).
    func push(_ id: Int) -> String {
        ids.append(id)
        let text = decode(ids)
        return text.hasSuffix("\u{FFFD}") ? "" : delta(Array(text.unicodeScalars))
    }

    /// Whatever is still held back (call once generation stopped).
    func finish() -> String { delta(Array(decode(ids).unicodeScalars)) }

    /// Compares Unicode scalars, not Characters: a combining mark arriving later changes the last
    /// Character of the emitted text but only appends scalars. Text already shown stays: if a decoder
    /// ever rewrites it, only the scalars past what was shown are emitted.
    private func delta(_ now: [Unicode.Scalar]) -> String {
        var out = ""
        out.unicodeScalars.append(contentsOf: now[min(emitted.count, now.count)...])
        emitted = now
        return out
    }
}

/// Prefill and decode tokens/s from timestamps the app records.
struct Throughput {
    private(set) var promptTokens = 0
    private(set) var generated = 0
    private var startTime: UInt64 = 0
    private var firstTokenTime: UInt64 = 0
    private var lastTokenTime: UInt64 = 0

    mutating func start(now: UInt64 = DispatchTime.now().uptimeNanoseconds, promptTokens: Int) {
        startTime = now; firstTokenTime = 0; lastTokenTime = 0; generated = 0; self.promptTokens = promptTokens
    }

    mutating func token(now: UInt64 = DispatchTime.now().uptimeNanoseconds) {
        if generated == 0 { firstTokenTime = now }
        lastTokenTime = now
        generated += 1
    }

    var prefillTokensPerSecond: Double { Self.rate(promptTokens, firstTokenTime, startTime) }
    var decodeTokensPerSecond: Double { Self.rate(generated - 1, lastTokenTime, firstTokenTime) }
    var overallTokensPerSecond: Double { Self.rate(generated, lastTokenTime, startTime) }

    static func rate(_ tokens: Int, _ end: UInt64, _ begin: UInt64) -> Double {
        guard tokens > 0, end > begin else { return 0 }
        return Double(tokens) * 1e9 / Double(end - begin)
    }

    static func format(_ tps: Double) -> String { tps <= 0 ? "–" : String(format: "%.1f tok/s", tps) }
}
