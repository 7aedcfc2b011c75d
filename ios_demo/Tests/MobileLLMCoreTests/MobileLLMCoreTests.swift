import Foundation
import XCTest
@testable import MobileLLMCore

// Mirrors android_demo/core-tests/CoreTests.kt. Optional real-data tests read:
//   MOBILELLM_TOKENIZER=path/to/tokenizer.model MOBILELLM_TOKENIZER_CASES=cases.json (a list of
//   {"text", "ids", "decoded"} written from the Python sentencepiece package, as tests/test_demo_apps.py does)
//   MOBILELLM_BUNDLE=path/to/bundle
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

    func testTokenizerMatchesSentencePiece() throws {
        let env = ProcessInfo.processInfo.environment
        guard let tokPath = env["MOBILELLM_TOKENIZER"], let casesPath = env["MOBILELLM_TOKENIZER_CASES"] else {
            throw XCTSkip("set MOBILELLM_TOKENIZER and MOBILELLM_TOKENIZER_CASES")
        }
        struct Case: Decodable { let text: String; let ids: [Int]; let decoded: String }
        let tok = try SentencePieceTokenizer(contentsOf: URL(fileURLWithPath: tokPath))
        let cases = try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: casesPath)))
        for c in cases {
            XCTAssertEqual(tok.encode(c.text), c.ids, c.text)
            XCTAssertEqual(tok.decode(c.ids), c.decoded, c.text)
            let stream = StreamingDecoder(tok, startOfText: true)
            XCTAssertEqual(c.ids.map { stream.push($0) }.joined(), c.decoded, c.text)
        }
    }

    func testRealBundle() throws {
        guard let path = ProcessInfo.processInfo.environment["MOBILELLM_BUNDLE"] else { throw XCTSkip("set MOBILELLM_BUNDLE") }
        let dir = URL(fileURLWithPath: path)
        let m = try BundleManifest.load(from: dir)
        XCTAssertEqual(BundleValidator.validate(dir, m, expectedTarget: m.target).errors, [])
        let tok = try SentencePieceTokenizer(contentsOf: dir.appendingPathComponent(m.tokenizer))
        XCTAssertEqual(tok.vocabSize, m.vocabSize)
        XCTAssertEqual(tok.bosId, m.bosId)
    }
}
