import FuzzSupport

@main
enum FuzzConfig {
    static func main() {
        writeSeedsIfAsked {
            [
                "full": Array("""
                runtime-directory: /run/vpb
                control-socket: /run/vpb/control.sock
                control-group: kvm
                control-mode: "0660"
                log-level: notice
                vm2-budgets:
                  vm2-a: 2T
                socket-directories: [/run/vpb-extra]
                bridges:
                  - name: net0
                    vhost-user-socket: /run/vpb/net0.sock
                    peer-socket: /run/vpb/net0-peer.sock
                    vm2: vm2-a
                    bar-size: 1T
                    mode: iommu
                    dma-window: 4G:16G
                    notifications: relay-sqpoll
                    busy-poll-us: 20
                    revocation-deadline-ms: 50
                    max-mappings: 4096
                    queue-pairs: 2
                    device-features: [event-idx]
                    vm1-access: {owner: root, group: kvm, mode: "0660", allow-users: [root]}
                    vm2-deadline-action: kill
                  - name: net1
                    bar-size: 64G
                    mode: static
                    static-windows: ["0:1G", "2G:3G"]
                    round-out-huge-pages: true
                """.utf8),
                "minimal": Array("bridges:\n  - name: a\n    bar-size: 1G\n".utf8),
            ]
        }
        runFuzzer { fuzzConfig($0, $1) }
    }
}
