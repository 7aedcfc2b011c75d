import CoreML
import Foundation

/// Runs a Core ML bundle (`mobilellm-export --target coreml`): MLModel with its KV cache in MLState
/// (iOS 18). Input, output and state names and dtypes come from manifest io, never from literals:
/// the rank-2 input takes token ids [1, S], the rank-4 input the additive causal mask
/// [1, 1, S, start+S] (its `masked_value` from the manifest where a key is hidden, 0 where row i may
/// see keys 0...start+i; the model infers the start position from the mask's width), the first
/// output is the logits [1, S, vocab].
@available(iOS 18.0, macOS 15.0, *)
final class CoreMLRunner: @unchecked Sendable {
    let manifest: BundleManifest
    let model: MLModel
    private let tokensSpec: TensorSpec
    private let maskSpec: TensorSpec
    private let maskedValue: Double
    private let logitsSpec: TensorSpec
    /// Prefill chunk sizes the model accepts (enumerated shapes), or nil for any size up to maxChunk.
    private let chunkSizes: [Int]?
    private let maxChunk: Int

    private init(manifest: BundleManifest, model: MLModel) throws {
        self.manifest = manifest
        self.model = model
        let inputs = manifest.io.inputs
        guard inputs.count == 2,
              let tokens = inputs.first(where: { $0.shape.count == 2 }),
              let mask = inputs.first(where: { $0.shape.count == 4 }),
              let masked = mask.maskedValue,
              let logits = manifest.io.outputs.first else {
            throw DemoError.model("manifest io must list token ids [1, S], a causal mask [1, 1, S, start+S] with masked_value, and logits; found \(manifest.io.inputs) -> \(manifest.io.outputs)")
        }
        tokensSpec = tokens
        maskSpec = mask
        maskedValue = masked
        logitsSpec = logits

        let desc = model.modelDescription
        for spec in inputs where desc.inputDescriptionsByName[spec.name] == nil {
            throw DemoError.model("manifest input '\(spec.name)' is not an input of \(manifest.artifact) (it has \(desc.inputDescriptionsByName.keys.sorted()))")
        }
        if desc.outputDescriptionsByName[logits.name] == nil {
            throw DemoError.model("manifest output '\(logits.name)' is not an output of \(manifest.artifact) (it has \(desc.outputDescriptionsByName.keys.sorted()))")
        }
        let modelStates = Set(desc.stateDescriptionsByName.keys)
        let manifestStates = Set((manifest.io.states ?? []).map { $0.name })
        if !manifestStates.isSubset(of: modelStates) {
            throw DemoError.model("manifest io.states \(manifestStates.sorted()) are not all states of the model (\(modelStates.sorted())); re-export the bundle")
        }
        if modelStates.isEmpty {
            throw DemoError.model("\(manifest.artifact) has no MLState KV cache; export it with mobilellm-export --target coreml (iOS 18 stateful model)")
        }

        // Which prefill lengths S the tokens input accepts.
        var sizes: [Int]? = nil
        var upper = manifest.maxContext - 1
        if let c = desc.inputDescriptionsByName[tokens.name]?.multiArrayConstraint {
            switch c.shapeConstraint.type {
            case .enumerated:
                sizes = c.shapeConstraint.enumeratedShapes.compactMap { $0.count == 2 ? $0[1].intValue : nil }.sorted()
            case .range:
                if c.shapeConstraint.sizeRangeForDimension.count == 2 {
                    let r = c.shapeConstraint.sizeRangeForDimension[1].rangeValue
                    if r.length > 0 && r.location + r.length - 1 < upper { upper = max(1, r.location + r.length - 1) }
                }
            default:
                if c.shape.count == 2 { sizes = [c.shape[1].intValue] }
            }
        }
        if let s = sizes, !s.contains(1) {
            throw DemoError.model("\(manifest.artifact) cannot take one token at a time (allowed lengths \(s)); decoding needs S = 1")
        }
        chunkSizes = sizes
        maxChunk = upper
    }

    /// Compiles (once, cached by the artifact's sha256) and loads the bundle's Core ML model.
    static func load(bundleDir: URL, manifest: BundleManifest, computeUnits: MLComputeUnits) async throws -> CoreMLRunner {
        let package = bundleDir.appendingPathComponent(manifest.artifact)
        let fm = FileManager.default
        let caches = try fm.url(for: .cachesDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        let digest = manifest.files.filter { $0.key.hasPrefix(manifest.artifact) }.map { $0.value.sha256 }.sorted().joined()
        let key = "\(manifest.name)-\(String(digest.prefix(32)))" // recompiled when the artifact changes
        let compiled = caches.appendingPathComponent(key).appendingPathExtension("mlmodelc")
        if !fm.fileExists(atPath: compiled.path) {
            let tmp = try await MLModel.compileModel(at: package)
            try? fm.removeItem(at: compiled)
            try fm.moveItem(at: tmp, to: compiled)
        }
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        let model = try await MLModel.load(contentsOf: compiled, configuration: config)
        return try CoreMLRunner(manifest: manifest, model: model)
    }

    /// A fresh KV cache for a new sequence.
    func makeState() -> MLState { model.makeState() }

    /// Prompt chunks that the model accepts, in order (no padding: padding would write junk KV entries).
    func prefillChunks(_ count: Int) -> [Int] {
        var out: [Int] = []
        var left = count
        while left > 0 {
            let n: Int
            if let sizes = chunkSizes {
                n = sizes.last(where: { $0 <= left }) ?? 1
            } else {
                n = min(left, maxChunk)
            }
            out.append(n)
            left -= n
        }
        return out
    }

    private func multiArray(_ spec: TensorSpec, _ values: [Double], shape: [Int]) throws -> MLMultiArray {
        let type: MLMultiArrayDataType
        switch spec.dtype {
        case "int32": type = .int32
        case "float16": type = .float16
        case "float32": type = .float32
        default: throw DemoError.model("input \(spec.name) has dtype \(spec.dtype), which Core ML inputs cannot take (int32, float16, float32)")
        }
        let arr = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: type)
        for (k, v) in values.enumerated() { arr[k] = NSNumber(value: v) }
        return arr
    }

    /// Row i (position start+i) may attend to keys 0...start+i.
    private func causalMask(rows: Int, start: Int) -> [Double] {
        let width = start + rows
        var values = [Double](repeating: maskedValue, count: rows * width)
        for i in 0..<rows { for k in 0...(start + i) { values[i * width + k] = 0 } }
        return values
    }

    /// Runs `ids` at positions start..<start+ids.count, updating `state`; returns the last row of logits.
    func forward(_ ids: [Int], start: Int, state: MLState) throws -> [Float] {
        let features: [String: MLFeatureValue] = [
            tokensSpec.name: MLFeatureValue(multiArray: try multiArray(tokensSpec, ids.map(Double.init), shape: [1, ids.count])),
            maskSpec.name: MLFeatureValue(multiArray: try multiArray(maskSpec, causalMask(rows: ids.count, start: start),
                                                                       shape: [1, 1, ids.count, start + ids.count])),
        ]
        let out = try model.prediction(from: MLDictionaryFeatureProvider(dictionary: features), using: state)
        guard let arr = out.featureValue(for: logitsSpec.name)?.multiArrayValue else {
            throw DemoError.model("the model returned no '\(logitsSpec.name)'")
        }
        return try lastRow(arr)
    }

    private func lastRow(_ arr: MLMultiArray) throws -> [Float] {
        let shape = arr.shape.map { $0.intValue }
        let strides = arr.strides.map { $0.intValue }
        guard let vocab = shape.last, shape.count >= 2 else { throw DemoError.model("logits have shape \(shape)") }
        guard vocab == manifest.vocabSize else {
            throw DemoError.model("logits have \(vocab) columns but manifest vocab_size is \(manifest.vocabSize)")
        }
        let rows = shape[shape.count - 2]
        let base = (rows - 1) * strides[shape.count - 2]
        let step = strides[shape.count - 1]
        var row = [Float](repeating: 0, count: vocab)
        switch arr.dataType {
        case .float32:
            arr.withUnsafeBufferPointer(ofType: Float.self) { p in for k in 0..<vocab { row[k] = p[base + k * step] } }
        #if arch(arm64)
        case .float16:
            arr.withUnsafeBufferPointer(ofType: Float16.self) { p in for k in 0..<vocab { row[k] = Float(p[base + k * step]) } }
        #endif
        default:
            for k in 0..<vocab { row[k] = arr[base + k * step].floatValue }
        }
        return row
    }
}
