import Testing
import SystemPackage
import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

/// `Files`: what the packaged binaries use instead of Foundation's file API.
@Suite struct FilesTests {
    @Test func directoryOfAPath() {
        #expect(Files.directory(of: "/a/b/c.sock") == "/a/b")
        #expect(Files.directory(of: "/a/b/") == "/a")
        #expect(Files.directory(of: "/a") == "/")
        #expect(Files.directory(of: "/") == "/")
        #expect(Files.directory(of: "name") == "")
        #expect(Files.directory(of: "d/name") == "d")
    }

    /// A file just written is all in the page cache (dirty); afterwards
    /// none of it is (mincore on a fresh mapping, which faults nothing in).
    @Test func droppingAFilesCachedPages() throws {
        // Not on tmpfs (where the pages are the file): beside the build when /tmp is one.
        let mounts = (try? Files.read("/proc/self/mounts")).map { String(decoding: $0, as: UTF8.self) } ?? ""
        let tmpIsTmpfs = mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().prefix(2) == ["/tmp", "tmpfs"] }
        let path = (tmpIsTmpfs ? ".build" : "/tmp") + "/vpb-cached-\(getpid())"
        defer { unlink(path) }
        let pages = 64, size = pages * 4096
        try Files.writeAtomically(path, [UInt8](repeating: 0x5A, count: size))
        func resident() throws -> Int {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            defer { close(fd) }
            let base = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0)
            guard let base, base != MAP_FAILED else { throw SystemCallError("mmap", errno: Errno(rawValue: errno)) }
            defer { munmap(base, size) }
            var vector = [UInt8](repeating: 0, count: pages)
            guard mincore(base, size, &vector) == 0 else { throw SystemCallError("mincore", errno: Errno(rawValue: errno)) }
            return vector.filter { $0 & 1 != 0 }.count
        }
        #expect(try resident() == pages)
        try Files.dropCachedPages(path)
        #expect(try resident() == 0)
        #expect(throws: SystemCallError.self) { try Files.dropCachedPages("\(path)-missing") }
    }

    @Test func writeAtomicallyReadAndMakeDirectories() throws {
        let root = "/tmp/vpb-files-\(getpid())"
        let path = "\(root)/x/y/state.json"
        defer { unlink(path); rmdir("\(root)/x/y"); rmdir("\(root)/x"); rmdir(root) }
        try Files.createDirectories(Files.directory(of: path))
        try Files.createDirectories(Files.directory(of: path)) // again: no error
        try Files.writeAtomically(path, Array("first".utf8), mode: 0o600)
        try Files.writeAtomically(path, Array("second".utf8), mode: 0o600)
        #expect(try Files.read(path) == Array("second".utf8))
        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_mode & 0o777 == 0o600)
        // No temporary file is left beside it; /proc files read to their end.
        #expect(try !Files.read("/proc/self/maps").isEmpty)
        #expect(access("\(root)/x/y/.state.json.tmp-\(getpid())", F_OK) != 0)
        // Missing files and files over the limit are errors naming the call.
        #expect(throws: SystemCallError.self) { try Files.read("\(root)/missing") }
        do { _ = try Files.read(path, limit: 3); Issue.record("read past the limit") } catch {
            #expect(error.errno == .fileTooLarge && "\(error)".contains("larger than 3 bytes"))
        }
        // A directory that cannot be made (a file is in the way).
        #expect(throws: SystemCallError.self) { try Files.writeAtomically("\(path)/inside", [1]) }
    }
}
