import CLinuxShim
import LinuxIO
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Fault injection through the kernel's own mechanism.
public enum Seccomp {
    /// From now on io_uring_setup fails with EPERM in this process and in
    /// whatever it executes (a filter cannot be removed), as under a
    /// container's seccomp policy. Sets no_new_privs.
    public static func denyIOURingSetup() throws(SystemCallError) {
        guard shim_deny_io_uring_setup() == 0 else { throw systemCallFailure("seccomp(deny io_uring_setup)") }
    }
}

/// The error of the system call that just failed (errno), for this target's throws.
func systemCallFailure(_ operation: String) -> SystemCallError { SystemCallError(operation, errno: Errno(rawValue: errno)) }
