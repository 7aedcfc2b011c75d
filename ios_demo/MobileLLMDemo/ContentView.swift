import SwiftUI
import UniformTypeIdentifiers

struct ContentView: View {
    @StateObject private var demo = DemoModel()
    @State private var importing = false

    var body: some View {
        NavigationStack {
            Form {
                Section("Bundle") {
                    Picker("Bundle", selection: $demo.selection) {
                        ForEach(demo.bundles, id: \.self) { url in
                            Text(url.lastPathComponent).tag(Optional(url))
                        }
                    }
                    Picker("Compute units", selection: $demo.compute) {
                        ForEach(ComputeChoice.allCases) { choice in
                            Text(choice.rawValue).tag(choice)
                        }
                    }
                    HStack {
                        Button("Rescan") { demo.refresh() }
                        Spacer()
                        Button("Import folder…") { importing = true }
                        Spacer()
                        Button("Load") { Task { await demo.load() } }.disabled(demo.running)
                    }
                    .buttonStyle(.borderless)
                    Text(demo.info).font(.footnote).textSelection(.enabled)
                }
                Section("Generate") {
                    TextField("Prompt", text: $demo.prompt, axis: .vertical).lineLimit(2...6)
                    VStack(alignment: .leading) {
                        Text("Temperature \(demo.temperature, specifier: "%.2f") (0 = greedy)")
                        Slider(value: $demo.temperature, in: 0...1.5)
                    }
                    VStack(alignment: .leading) {
                        Text("Max new tokens \(Int(demo.maxNewTokens)) (context \(demo.maxContext))")
                        Slider(value: $demo.maxNewTokens, in: 1...Double(max(2, demo.maxContext - 1)), step: 1)
                    }
                    Button(demo.running ? "Stop" : "Generate") {
                        if demo.running { demo.stop() } else { demo.generate() }
                    }
                    .disabled(!demo.loaded)
                    Text(demo.stats).font(.footnote.monospacedDigit())
                }
                Section("Output") {
                    Text(demo.output).textSelection(.enabled)
                }
            }
            .navigationTitle("MobileLLM")
            .fileImporter(isPresented: $importing, allowedContentTypes: [.folder]) { result in
                if case .success(let url) = result { demo.importFolder(url) }
            }
            .onAppear { demo.refresh() }
        }
    }
}
