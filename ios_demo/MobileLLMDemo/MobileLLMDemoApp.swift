import SwiftUI

@main
struct MobileLLMDemoApp: App {
    var body: some Scene {
        WindowGroup {
            ContentView()
        }
    }
}
