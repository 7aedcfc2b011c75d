import CoreML
import Foundation
import SwiftUI
import Tokenizers

/// Set from the UI, read by the generation task.
final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set(_ v: Bool) { lock.lock(); value = v; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
}

/// Token timing shared with the ExecuTorch runner's callback.
final class ThroughputBox: @unchecked Sendable {
    private let lock = NSLock()
    private var t = Throughput()
    func start(promptTokens: Int) { lock.lock(); t.start(promptTokens: promptTokens); lock.unlock() }
    func token() -> Throughput { lock.lock(); defer { lock.unlock() }; t.token(); return t }
}

enum ComputeChoice: String, CaseIterable, Identifiable {
    case cpuAndNeuralEngine = "CPU + Neural Engine"
    case all = "All (CPU, GPU, Neural Engine)"
    case cpuAndGPU = "CPU + GPU"
    case cpuOnly = "CPU only"

    var id: String { rawValue }

    var units: MLComputeUnits {
        switch self {
        case .cpuAndNeuralEngine: return .cpuAndNeuralEngine
        case .all: return .all
        case .cpuAndGPU: return .cpuAndGPU
        case .cpuOnly: return .cpuOnly
        }
    }
}

/// Finds bundles, checks and loads one, and runs generation off the main thread.
///
/// Bundles are looked for in the app's Documents folder (Finder / Files app: the app enables file
/// sharing), in a `Bundles` folder reference inside the app, or imported with the folder picker.
/// Core ML bundles run with CoreMLRunner, tokenized by swift-transformers' Tokenizers (AutoTokenizer
/// reads the bundle's tokenizer.json + tokenizer_config.json); ExecuTorch bundles run when the
/// ExecuTorch Swift package is linked (ExecuTorchRunner: its runner tokenizes), see README.
@MainActor
final class DemoModel: ObservableObject {
    @Published var bundles: [URL] = []
    @Published var selection: URL?
    @Published var info = "Looking for bundles…"
    @Published var output = ""
    @Published var stats = ""
    @Published var running = false
    @Published var loaded = false
    @Published var prompt = "In the beginning"
    @Published var temperature = 0.0
    @Published var maxNewTokens = 128.0
    @Published var maxContext = 512
    @Published var compute: ComputeChoice = .cpuAndNeuralEngine

    private var manifest: BundleManifest?
    /// swift-transformers' tokenizer of a Core ML bundle (ExecuTorch's runner tokenizes by itself).
    private var tokenizer: Tokenizer?
    private var coreml: CoreMLRunner?
    #if canImport(ExecuTorchLLM)
    private var executorch: ExecuTorchRunner?
    #endif
    private let stopFlag = StopFlag()

    private var documents: URL { FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0] }

    private func hasManifest(_ dir: URL) -> Bool {
        FileManager.default.fileExists(atPath: dir.appendingPathComponent(BundleManifest.fileName).path)
    }

    func refresh() {
        var roots = [documents]
        if let resources = Bundle.main.resourceURL { roots.append(resources.appendingPathComponent("Bundles")) }
        var found: [URL] = []
        for root in roots {
            if hasManifest(root) { found.append(root) }
            let children = (try? FileManager.default.contentsOfDirectory(at: root, includingPropertiesForKeys: nil)) ?? []
            for child in children.sorted(by: { $0.lastPathComponent < $1.lastPathComponent }) where hasManifest(child) {
                found.append(child)
            }
        }
        bundles = found
        if selection == nil || !found.contains(selection!) { selection = found.first }
        info = found.isEmpty
            ? "No bundle found. Export one with `mobilellm-export --target coreml`, then copy the bundle folder into this app's Documents (Finder › your iPhone › Files, or the Files app), or tap Import folder…"
            : "\(found.count) bundle(s) found; pick one and tap Load."
    }

    /// Copies a folder picked in the Files app into Documents (Core ML needs a real, stable URL).
    func importFolder(_ url: URL) {
        let scoped = url.startAccessingSecurityScopedResource()
        defer { if scoped { url.stopAccessingSecurityScopedResource() } }
        let dest = documents.appendingPathComponent(url.lastPathComponent)
        do {
            if FileManager.default.fileExists(atPath: dest.path) { try FileManager.default.removeItem(at: dest) }
            try FileManager.default.copyItem(at: url, to: dest)
            refresh()
            selection = dest
            info = "Imported \(dest.lastPathComponent); tap Load."
        } catch {
            info = "Import failed: \(error.localizedDescription)"
        }
    }

    func load() async {
        guard let dir = selection else { info = "Pick a bundle first."; return }
        loaded = false
        coreml = nil
        tokenizer = nil
        #if canImport(ExecuTorchLLM)
        executorch = nil
        #endif
        info = "Checking \(dir.lastPathComponent)…"
        do {
            let m = try BundleManifest.load(from: dir)
            let check = BundleValidator.validate(dir, m, expectedTarget: m.target == "executorch" ? "executorch" : "coreml")
            guard check.errors.isEmpty else {
                info = "Cannot use \(dir.lastPathComponent):\n• " + check.errors.joined(separator: "\n• ")
                return
            }
            var tok: Tokenizer? = nil
            switch m.target {
            case "coreml":
                info = "Loading the tokenizer (swift-transformers)…"
                let t = try await AutoTokenizer.from(modelFolder: dir)
                try Self.checkTokenizer(t, m)
                tok = t
                info = "Compiling and loading \(m.artifact) (first load compiles the model; later loads reuse it)…"
                coreml = try await CoreMLRunner.load(bundleDir: dir, manifest: m, computeUnits: compute.units)
            case "executorch":
                #if canImport(ExecuTorchLLM)
                executorch = try ExecuTorchRunner(bundleDir: dir, manifest: m)
                #else
                throw DemoError.bundle("\(m.name) is an ExecuTorch bundle: add the ExecuTorch Swift package (executorch_llm, backend_xnnpack, kernels_llm, kernels_optimized, kernels_quantized) to run it, see README")
                #endif
            default:
                throw DemoError.bundle("bundle target '\(m.target)' is not runnable here (this app runs coreml, and executorch with the ExecuTorch package)")
            }
            manifest = m
            tokenizer = tok
            maxContext = m.maxContext
            maxNewTokens = min(maxNewTokens, Double(max(1, m.maxContext - 1)))
            let parity = m.parity.map { $0.passed ? "passed" : "FAILED" } ?? "not run"
            let tokenizedBy = m.target == "coreml" ? "swift-transformers (tokenizer.json)" : "ExecuTorch's runner (\(m.tokenizer))"
            var lines = [
                "\(m.name): \(m.artifact) (\(m.bits)-bit), tokenized by \(tokenizedBy)",
                "model: dim \(m.model.dim), \(m.model.nLayers) stored / \(m.model.nApplied) applied blocks (\(m.model.layerSharing) sharing)",
                "context \(m.maxContext) tokens, vocab \(m.vocabSize), BOS \(m.bosId), EOS \(m.eosIds)",
                "inputs \(m.io.inputs); outputs \(m.io.outputs); \(m.io.states?.count ?? 0) state tensors",
                "parity at export: \(parity)",
            ]
            lines += check.warnings.map { "⚠ " + $0 }
            info = lines.joined(separator: "\n")
            loaded = true
        } catch {
            info = "Cannot load \(dir.lastPathComponent): \(error.localizedDescription)"
        }
    }

    /// The bundle's tokenizer.json must agree with the manifest: its BOS is manifest bos_id (what the model
    /// was trained with first, and what the export's parity check fed), its ids lie inside vocab_size.
    nonisolated static func checkTokenizer(_ tok: Tokenizer, _ m: BundleManifest) throws {
        if let bos = tok.bosTokenId, bos != m.bosId {
            throw DemoError.tokenizer("the bundle's tokenizer has BOS \(bos) but manifest bos_id is \(m.bosId); re-export the bundle")
        }
        let probe = tok.encode(text: "a")
        guard probe.allSatisfy({ (0..<m.vocabSize).contains($0) }) else {
            throw DemoError.tokenizer("the bundle's tokenizer gives ids outside vocab_size \(m.vocabSize): \(probe); re-export the bundle")
        }
    }

    func stop() {
        stopFlag.set(true)
        #if canImport(ExecuTorchLLM)
        executorch?.stop()
        #endif
    }

    func generate() {
        guard let m = manifest else { return }
        if prompt.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty { stats = "the prompt is empty"; return }
        // Core ML: swift-transformers encodes (tokenizer.json's BOS template adds BOS; withLeadingBos makes
        // sure manifest bos_id leads exactly once). ExecuTorch: the runner encodes, with one BOS (bosCount).
        var ids: [Int] = []
        if let tok = tokenizer {
            ids = withLeadingBos(tok.encode(text: prompt), bosId: m.bosId)
            if let problem = PromptBudget(maxContext: m.maxContext).problem(promptTokens: ids.count) {
                stats = problem
                return
            }
            stats = "prompt \(ids.count) tokens of \(m.maxContext)"
        } else {
            stats = "context \(m.maxContext) tokens; generating…"
        }
        output = prompt
        running = true
        stopFlag.set(false)
        let maxNew = Int(maxNewTokens)
        let temperature = Float(self.temperature)
        let flag = stopFlag
        let coreml = self.coreml
        let tok = self.tokenizer
        #if canImport(ExecuTorchLLM)
        let executorch = self.executorch
        #endif
        let promptText = prompt
        let promptIds = ids

        // DemoModel lives as long as the app (a @StateObject of the root view): capture it strongly.
        Task.detached(priority: .userInitiated) {
            do {
                if let runner = coreml, let tok = tok {
                    try await DemoModel.runCoreML(runner, m, tok, promptIds, maxNew, temperature, flag) { delta, line in
                        await self.show(delta, line)
                    }
                }
                #if canImport(ExecuTorchLLM)
                if let et = executorch {
                    let box = ThroughputBox()
                    box.start(promptTokens: 0) // the runner counts the prompt; its length is not known here
                    try et.generate(promptText, maxNewTokens: maxNew, temperature: temperature) { token in
                        let t = box.token()
                        let line = "\(t.generated) tokens · decode \(Throughput.format(t.decodeTokensPerSecond))"
                        // Main-queue FIFO keeps tokens in order (separate Tasks could reorder them).
                        DispatchQueue.main.async { MainActor.assumeIsolated { self.show(token, line) } }
                    }
                }
                #endif
                _ = promptText
            } catch {
                let message = await self.statsWithError(error)
                await self.show("", message)
            }
            await self.finish()
        }
    }

    private func show(_ delta: String, _ line: String?) {
        output += delta
        if let l = line { stats = l }
    }

    private func statsWithError(_ error: Error) -> String { stats + "\nerror: \(error.localizedDescription)" }

    private func finish() { running = false }

    /// Prefill in chunks the model accepts, then decode one token at a time with the KV cache in MLState.
    nonisolated private static func runCoreML(_ runner: CoreMLRunner, _ m: BundleManifest, _ tok: Tokenizer, _ ids: [Int],
                                              _ maxNew: Int, _ temperature: Float, _ flag: StopFlag,
                                              emit: (String, String?) async -> Void) async throws {
        let state = runner.makeState() // fresh KV cache for this request
        var sampler = Sampler(temperature: temperature)
        let rule = StopRule(eosIds: Set(m.eosIds), maxContext: m.maxContext, maxNewTokens: maxNew)
        // The prompt is the decoding context, so the first word keeps its leading space.
        let text = TextStream(context: ids) { tok.decode(tokens: $0, skipSpecialTokens: true) }
        var throughput = Throughput()
        throughput.start(promptTokens: ids.count)
        var logits: [Float] = []
        var pos = 0
        for n in runner.prefillChunks(ids.count) {
            logits = try runner.forward(Array(ids[pos..<(pos + n)]), start: pos, state: state)
            pos += n
        }
        var generated = 0
        while true {
            let next = sampler.sample(logits)
            generated += 1
            throughput.token()
            let reason: StopReason? = flag.isSet ? .user : rule.check(token: next, promptTokens: ids.count, generated: generated)
            var delta = rule.isEos(next) ? "" : text.push(next)
            if reason != nil { delta += text.finish() }
            var line = "\(generated) tokens · prefill \(Throughput.format(throughput.prefillTokensPerSecond)) · decode \(Throughput.format(throughput.decodeTokensPerSecond))"
            if let r = reason { line += "\n\(r.rawValue)" }
            await emit(delta, line)
            if reason != nil { return }
            logits = try runner.forward([next], start: pos, state: state)
            pos += 1
        }
    }
}
