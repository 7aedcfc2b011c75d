import Foundation
import Tokenizers
import XCTest
@testable import MobileLLMCore

// Mirrors android_demo/core-tests/CoreTests.kt. The real-bundle test reads MOBILELLM_BUNDLE=path/to/bundle
// (a Core ML or ExecuTorch bundle) and loads its tokenizer with swift-transformers, as the app does.
final class MobileLLMCoreTests: XCTestCase {
    static let manifestJSON = """
    {"schema_version": 1, "name": "t-coreml-4bit", "target": "coreml", "artifact": "model.mlpackage",
     "artifacts": ["model.mlpackage"], "tokenizer": "tokenizer.model", "bits": 4, "embedding_bits": 8, "group_size": 32,
     "max_context": 16, "vocab_size": 10, "bos_id": 1, "eos_ids": [2],
     "model": {"dim": 8, "n_layers": 2, "n_applied": 4, "n_heads": 2, "n_kv_heads": 1, "head_dim": 4, "ffn_dim": 16,
               "vocab_size": 10, "layer_sharing": "immediate", "share_embedding": true, "rope_theta": 10000.0,
               "norm_eps": 1e-5, "unique_params": 123},
     "io": {"inputs": [{"name": "tokens", "dtype": "int32", "shape": [1, "1..15"]}, {"name": "input_pos", "dtype": "int32", "shape": [1]}],
            "outputs": [{"name": "logits", "dtype": "float16", "shape": [1, "seq_len", 10]}],
            "states": [{"name": "k_0", "dtype": "float16", "shape": [1, 1, 16, 4]}]},
     "files": {"model.mlpackage/Manifest.json": {"sha256": "00", "bytes": 5}, "tokenizer.model": {"sha256": "11", "bytes": 7}},
     "parity": null}
    """

    func testManifestDecodes() throws {
        let m = try JSONDecoder().decode(BundleManifest.self, from: Data(Self.manifestJSON.utf8))
        XCTAssertEqual(m.target, "coreml")
        XCTAssertEqual(m.maxContext, 16)
        XCTAssertEqual(m.eosIds, [2])
        XCTAssertEqual(m.io.inputs.map { $0.name }, ["tokens", "input_pos"])
        XCTAssertEqual(m.io.states?.count, 1)
        XCTAssertNil(m.parity)
        XCTAssertEqual(m.model.nApplied, 4)
    }

    func testValidatorChecksFiles() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("model.mlpackage"), withIntermediateDirectories: true)
        try Data(count: 5).write(to: dir.appendingPathComponent("model.mlpackage/Manifest.json"))
        try Data(count: 7).write(to: dir.appendingPathComponent("tokenizer.model"))
        defer { try? FileManager.default.removeItem(at: dir) }
        let m = try JSONDecoder().decode(BundleManifest.self, from: Data(Self.manifestJSON.utf8))
        let ok = BundleValidator.validate(dir, m, expectedTarget: "coreml")
        XCTAssertEqual(ok.errors, [])
        XCTAssertEqual(ok.warnings.count, 1) // --no-parity
        XCTAssertFalse(BundleValidator.validate(dir, m, expectedTarget: "executorch").errors.isEmpty)
        try Data(count: 6).write(to: dir.appendingPathComponent("tokenizer.model"))
        XCTAssertTrue(BundleValidator.validate(dir, m, expectedTarget: "coreml").errors.contains { $0.contains("tokenizer.model is 6 bytes") })
    }

    func testSamplerAndRules() {
        XCTAssertEqual(Sampler.argmax([0, 3, 3, -1]), 1)
        var cold = Sampler(temperature: 0.05, seed: 1)
        for _ in 0..<50 { XCTAssertEqual(cold.sample([1, 2, 1.5]), 1) }
        var s = Sampler(temperature: 1, seed: 42)
        var ones = 0
        for _ in 0..<20000 where s.sample([0, Float(log(3.0))]) == 1 { ones += 1 }
        XCTAssertEqual(Double(ones) / 20000, 0.75, accuracy: 0.02)
        let rule = StopRule(eosIds: [2, 7], maxContext: 10, maxNewTokens: 5)
        XCTAssertEqual(rule.check(token: 7, promptTokens: 3, generated: 1), .eos)
        XCTAssertNil(rule.check(token: 4, promptTokens: 8, generated: 1))
        XCTAssertEqual(rule.check(token: 4, promptTokens: 8, generated: 2), .contextFull)
        XCTAssertEqual(rule.check(token: 4, promptTokens: 3, generated: 5), .maxNewTokens)
        XCTAssertNil(PromptBudget(maxContext: 512).problem(promptTokens: 511))
        XCTAssertNotNil(PromptBudget(maxContext: 512).problem(promptTokens: 512))
        var t = Throughput()
        t.start(now: 0, promptTokens: 20)
        t.token(now: 500_000_000)
        for k in 1...10 { t.token(now: 500_000_000 + UInt64(k) * 100_000_000) }
        XCTAssertEqual(t.prefillTokensPerSecond, 40, accuracy: 1e-9)
        XCTAssertEqual(t.decodeTokensPerSecond, 10, accuracy: 1e-9)
    }

    func testLeadingBos() {
        XCTAssertEqual(withLeadingBos([1, 5, 6], bosId: 1), [1, 5, 6])
        XCTAssertEqual(withLeadingBos([5, 6], bosId: 1), [1, 5, 6])
        XCTAssertEqual(withLeadingBos([], bosId: 1), [1])
    }

    func testTextStream() {
        // Toy ids to text: 1 = BOS (dropped), 10 = "a", 11 = " b", 20/21 = the two UTF-8 bytes of "é"
        // (a lone first byte decodes to U+FFFD, like byte-fallback pieces), 30 = combining acute accent.
        func toyText(_ ids: [Int]) -> String {
            var bytes: [UInt8] = []
            for id in ids {
                switch id {
                case 10: bytes += Array("a".utf8)
                case 11: bytes += Array(" b".utf8)
                case 20: bytes.append(0xC3)
                case 21: bytes.append(0xA9)
                case 30: bytes += Array("\u{0301}".utf8)
                default: break
                }
            }
            return String(decoding: bytes, as: UTF8.self)
        }
        let stream = TextStream(context: [1, 10], decode: toyText)
        XCTAssertEqual(stream.push(11), " b")
        XCTAssertEqual(stream.push(20), "") // half a character: held back
        XCTAssertEqual(stream.push(21), "é")
        XCTAssertEqual(stream.push(30), "\u{0301}")
        XCTAssertEqual(stream.finish(), "")
        let cut = TextStream(context: [1], decode: toyText)
        XCTAssertEqual(cut.push(20), "")
        XCTAssertEqual(cut.finish(), "\u{FFFD}") // generation stopped mid-character: shown as is
    }

    func testRealBundle() async throws {
        guard let path = ProcessInfo.processInfo.environment["MOBILELLM_BUNDLE"] else { throw XCTSkip("set MOBILELLM_BUNDLE") }
        let dir = URL(fileURLWithPath: path)
        let m = try BundleManifest.load(from: dir)
        XCTAssertEqual(BundleValidator.validate(dir, m, expectedTarget: m.target).errors, [])
        // What the app does for Core ML bundles: swift-transformers reads tokenizer.json + tokenizer_config.json.
        let tok = try await AutoTokenizer.from(modelFolder: dir)
        XCTAssertEqual(tok.bosTokenId, m.bosId)
        let ids = tok.encode(text: "And God said, Let there be light")
        XCTAssertEqual(ids.first, m.bosId) // the BOS template, without withLeadingBos's help
        XCTAssertEqual(withLeadingBos(ids, bosId: m.bosId), ids)
        XCTAssertTrue(ids.allSatisfy { (0..<m.vocabSize).contains($0) })
        XCTAssertEqual(tok.decode(tokens: ids, skipSpecialTokens: true), "And God said, Let there be light")
    }
}
