import Foundation

#if canImport(ExecuTorchLLM)
import ExecuTorchLLM

/// Runs an ExecuTorch bundle (`--target executorch`) with ExecuTorch's stock LLM runner (`TextRunner`,
/// the Swift name of ExecuTorchLLMTextRunner in the `executorch_llm` Swift package product). Compiled
/// only when the app links the ExecuTorch Swift package (see README: "Running the ExecuTorch bundle on
/// iOS"). The runner tokenizes with the original file manifest `tokenizer` names (tokenizer.model, or
/// tokenizer.json for byte-level BPE checkpoints; ExecuTorch 1.5.1's runner refuses the tokenizer.json
/// converted from a SentencePiece model), samples, and stops on the .pte's EOS metadata itself: the app
/// has no tokenizer for it.
final class ExecuTorchRunner: @unchecked Sendable {
    let manifest: BundleManifest
    private let runner: TextRunner

    init(bundleDir: URL, manifest: BundleManifest) throws {
        self.manifest = manifest
        runner = TextRunner(
            modelPath: bundleDir.appendingPathComponent(manifest.artifact).path,
            tokenizerPath: bundleDir.appendingPathComponent(manifest.tokenizer).path
        )
        try runner.load()
    }

    /// One BOS (`bosCount`, 0 by default in the runner; MobileLLM is trained with BOS first), no echo of
    /// the prompt (the runner's default echoes it; the app shows the prompt itself), at most
    /// `maxNewTokens` new tokens, the whole manifest max_context as sequence length: the runner counts
    /// the prompt and refuses one that does not fit.
    func generate(_ prompt: String, maxNewTokens: Int, temperature: Float, onToken: @escaping (String) -> Void) throws {
        runner.reset()
        let maxContext = manifest.maxContext
        try runner.generate(prompt, Config {
            $0.bosCount = 1
            $0.isEchoEnabled = false
            $0.maximumNewTokens = maxNewTokens
            $0.sequenceLength = maxContext
            $0.temperature = Double(temperature)
        }) { token in onToken(token) }
    }

    func stop() { runner.stop() }
}
#endif
