import Foundation

// manifest.json of a mobilellm-export bundle, decoded with Codable. Every key the app reads is a
// CodingKeys case of a struct marked `// manifest-path: <where it sits in manifest.json>`, so
// tests/test_demo_apps.py can list the keys and check each against the manifest schema and a real
// exported bundle. Optional Swift properties are keys the schema allows to be absent or null.

struct BundleManifest: Codable { // manifest-path: .
    static let fileName = "manifest.json"
    static let supportedSchemaVersion = 1

    let schemaVersion: Int
    let name: String
    let target: String
    let artifact: String
    let tokenizer: String
    let bits: Int
    let maxContext: Int
    let vocabSize: Int
    let bosId: Int
    let eosIds: [Int]
    let model: ModelInfo
    let io: IOSpec
    let files: [String: FileEntry]
    let parity: ParitySummary?

    enum CodingKeys: String, CodingKey {
        case schemaVersion = "schema_version", name, target, artifact, tokenizer, bits
        case maxContext = "max_context", vocabSize = "vocab_size", bosId = "bos_id", eosIds = "eos_ids"
        case model, io, files, parity
    }

    static func load(from bundleDir: URL) throws -> BundleManifest {
        let url = bundleDir.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw DemoError.bundle("\(bundleDir.lastPathComponent): no \(fileName); is this a bundle written by mobilellm-export?")
        }
        do {
            return try JSONDecoder().decode(BundleManifest.self, from: Data(contentsOf: url))
        } catch let error as DecodingError {
            throw DemoError.bundle("\(fileName) does not match what this app expects (\(error.readable)); re-export the bundle")
        }
    }
}

struct ModelInfo: Codable { // manifest-path: model
    let dim: Int
    let nLayers: Int
    let nApplied: Int
    let vocabSize: Int
    let layerSharing: String

    enum CodingKeys: String, CodingKey {
        case dim, nLayers = "n_layers", nApplied = "n_applied", vocabSize = "vocab_size", layerSharing = "layer_sharing"
    }
}

struct IOSpec: Codable { // manifest-path: io
    let inputs: [TensorSpec]
    let outputs: [TensorSpec]
    let states: [TensorSpec]?

    enum CodingKeys: String, CodingKey {
        case inputs, outputs, states
    }
}

struct TensorSpec: Codable, CustomStringConvertible { // manifest-path: io.inputs[],io.outputs[],io.states[]
    let name: String
    let dtype: String
    let shape: [ShapeDim]
    /// For an additive attention-mask input: the value of a masked position (0 = attend).
    let maskedValue: Double?

    enum CodingKeys: String, CodingKey {
        case name, dtype, shape
        case maskedValue = "masked_value"
    }

    var description: String { "\(name) \(dtype) [\(shape.map { $0.description }.joined(separator: ", "))]" }
}

/// A shape entry: a fixed size or a string naming a dynamic axis ("seq_len", "1..511").
enum ShapeDim: Codable, CustomStringConvertible {
    case fixed(Int)
    case dynamic(String)

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(Int.self) { self = .fixed(n) } else { self = .dynamic(try c.decode(String.self)) }
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .fixed(let n): try c.encode(n)
        case .dynamic(let s): try c.encode(s)
        }
    }

    var description: String {
        switch self {
        case .fixed(let n): return String(n)
        case .dynamic(let s): return s
        }
    }
}

struct FileEntry: Codable { // manifest-path: files{}
    let sha256: String
    let bytes: Int64

    enum CodingKeys: String, CodingKey {
        case sha256, bytes
    }
}

struct ParitySummary: Codable { // manifest-path: parity
    let passed: Bool

    enum CodingKeys: String, CodingKey {
        case passed
    }
}

enum DemoError: LocalizedError {
    case bundle(String)
    case model(String)
    case tokenizer(String)

    var errorDescription: String? {
        switch self {
        case .bundle(let m), .model(let m), .tokenizer(let m): return m
        }
    }
}

extension DecodingError {
    var readable: String {
        switch self {
        case .keyNotFound(let key, let ctx):
            return "missing key '\((ctx.codingPath.map { $0.stringValue } + [key.stringValue]).joined(separator: "."))'"
        case .typeMismatch(_, let ctx), .valueNotFound(_, let ctx), .dataCorrupted(let ctx):
            return "bad value at '\(ctx.codingPath.map { $0.stringValue }.joined(separator: "."))': \(ctx.debugDescription)"
        @unknown default:
            return String(describing: self)
        }
    }
}

/// Checks a bundle folder against its manifest: schema version, target, artifact and tokenizer recorded
/// in `files`, every file of `files` present with the recorded size (the tokenizer library and the
/// runtimes read more than the artifact: tokenizer.json, tokenizer_config.json), ids in range.
/// Returns (errors, warnings).
enum BundleValidator {
    static func validate(_ dir: URL, _ m: BundleManifest, expectedTarget: String) -> (errors: [String], warnings: [String]) {
        var errors: [String] = []
        var warnings: [String] = []
        if m.schemaVersion != BundleManifest.supportedSchemaVersion {
            errors.append("manifest schema_version \(m.schemaVersion) is not \(BundleManifest.supportedSchemaVersion); use a demo app matching the exporter version")
        }
        if m.target != expectedTarget {
            errors.append("bundle target is '\(m.target)', this screen runs '\(expectedTarget)' bundles (export with --target \(expectedTarget))")
        }
        func unsafe(_ rel: String) -> Bool { rel.isEmpty || rel.hasPrefix("/") || rel.split(separator: "/").contains("..") }
        for rel in [m.artifact, m.tokenizer] {
            if unsafe(rel) { errors.append("manifest names an unsafe path '\(rel)'"); continue }
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: dir.appendingPathComponent(rel).path, isDirectory: &isDir) else {
                errors.append("\(rel) is missing from the bundle folder"); continue
            }
            // A directory artifact (.mlpackage) is recorded file by file under "<dir>/...".
            if !m.files.keys.contains(where: { isDir.boolValue ? $0.hasPrefix(rel + "/") : $0 == rel }) {
                errors.append("\(rel) has no entry in manifest files")
            }
        }
        for (name, entry) in m.files.sorted(by: { $0.key < $1.key }) {
            if unsafe(name) { errors.append("manifest names an unsafe path '\(name)'"); continue }
            let size = (try? FileManager.default.attributesOfItem(atPath: dir.appendingPathComponent(name).path)[.size] as? NSNumber)?.int64Value
            if size == nil {
                errors.append("\(name) is missing from the bundle")
            } else if size != entry.bytes {
                errors.append("\(name) is \(size!) bytes, the manifest recorded \(entry.bytes) (incomplete copy?)")
            }
        }
        let vocab = 0..<max(0, m.vocabSize)
        if m.vocabSize < 1 { errors.append("vocab_size \(m.vocabSize) must be positive") }
        if m.vocabSize != m.model.vocabSize { errors.append("vocab_size \(m.vocabSize) differs from model.vocab_size \(m.model.vocabSize)") }
        if !vocab.contains(m.bosId) { errors.append("bos_id \(m.bosId) is outside the vocabulary") }
        if m.eosIds.isEmpty { errors.append("eos_ids is empty; generation could never stop on its own") }
        for e in m.eosIds where !vocab.contains(e) { errors.append("eos id \(e) is outside the vocabulary") }
        if m.maxContext < 2 { errors.append("max_context \(m.maxContext) must be at least 2") }
        switch m.parity?.passed {
        case .none: warnings.append("exported with --no-parity: outputs were not checked against PyTorch")
        case .some(false): warnings.append("this bundle FAILED its parity check at export (see parity.md in the bundle)")
        case .some(true): break
        }
        return (errors, warnings)
    }
}
