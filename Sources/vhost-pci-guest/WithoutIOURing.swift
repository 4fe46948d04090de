import ArgumentParser
import FaultInjection
import Foundation
import LinuxIO

/// Runs a command where io_uring_setup is refused (EPERM, by a seccomp
/// filter), as in a container whose policy blocks io_uring: how the tests
/// force the daemon's epoll fallback with the kernel's own mechanism.
struct WithoutIOURingCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "without-io-uring",
        abstract: "Run COMMAND with io_uring_setup refused by a seccomp filter (EPERM), as a container policy does."
    )

    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments.")
    var command: [String]

    func run() throws {
        let args = command.first == "--" ? Array(command.dropFirst()) : command
        guard let path = args.first else { throw ValidationError("give the command to run") }
        try Seccomp.denyIOURingSetup()
        var argv = args.map { strdup($0) } + [nil]
        execv(path, &argv)
        throw ValidationError("cannot execute \(path): \(String(cString: strerror(errno)))")
    }
}
