import Foundation

#if canImport(ExecuTorchLLM)
import ExecuTorchLLM

/// Runs an ExecuTorch bundle (`--target executorch`) with ExecuTorch's stock LLM runner
/// (`TextLLMRunner` from the `executorch_llm` Swift package product). Compiled only when the app links
/// the ExecuTorch Swift package (see README: "Running the ExecuTorch bundle on iOS"); the runner
/// tokenizes with the bundle's tokenizer file, samples, and stops on the .pte's EOS metadata itself.
final class ExecuTorchRunner: @unchecked Sendable {
    let manifest: BundleManifest
    private let runner: TextLLMRunner

    init(bundleDir: URL, manifest: BundleManifest) throws {
        self.manifest = manifest
        runner = TextLLMRunner(
            modelPath: bundleDir.appendingPathComponent(manifest.artifact).path,
            tokenizerPath: bundleDir.appendingPathComponent(manifest.tokenizer).path,
            specialTokens: []
        )
        try runner.load()
    }

    /// `sequenceLength` = prompt + new tokens, capped by the app at manifest max_context.
    func generate(_ prompt: String, sequenceLength: Int, temperature: Float, onToken: @escaping (String) -> Void) throws {
        runner.reset()
        try runner.generate(prompt, Config {
            $0.temperature = temperature
            $0.sequenceLength = sequenceLength
        }) { token in onToken(token) }
    }

    func stop() { runner.stop() }
}
#endif
