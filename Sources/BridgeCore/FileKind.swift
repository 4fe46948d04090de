/// What a file descriptor a peer sent really is, as the kernel reports it
/// (fstat and the fd's link in /proc), never as the message claims. A vring's
/// kick/call/err fd must be an eventfd, memory must be a regular file (memfd,
/// tmpfs, hugetlbfs), the back-end channel must be a socket: anything else is
/// refused before it is used.
public enum FileKind: Equatable, Sendable, CustomStringConvertible {
    case eventfd
    case regularFile
    case socket
    case pipe
    /// Anything else (a directory, a device, another anon inode); the text is
    /// what the kernel calls it.
    case other(String)
    /// The fd could not be examined.
    case unknown

    public var description: String {
        switch self {
        case .eventfd: "an eventfd"
        case .regularFile: "a regular file"
        case .socket: "a socket"
        case .pipe: "a pipe"
        case .other(let what): "\(what)"
        case .unknown: "an fd that could not be examined"
        }
    }
}
