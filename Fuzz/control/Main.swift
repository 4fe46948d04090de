import FuzzSupport

@main
enum FuzzControl {
    static func main() {
        writeSeedsIfAsked {
            [
                "status-list-show": Array(#"{"command":"status"}\#n{"command":"list"}\#n{"command":"show","name":"b0"}\#n{"version":1,"command":"stats","name":"b0"}"#.utf8),
                "map-unmap-freeze": Array(#"{"command":"map","name":"b0","bus":"0x1000","gpa":"0x0","length":"0x1000"}\#n{"command":"unmap","name":"b0","bus":"0x1000","length":"0x1000"}\#n{"command":"freeze","name":"b0"}"#.utf8),
                "create-destroy": Array(#"{"command":"create","bridge":{"name":"c1","bar-size":"1G","mode":"identity"}}\#n{"command":"destroy","name":"c1"}"#.utf8),
                "metrics-log-level-reload": Array(#"{"command":"metrics"}\#n{"command":"log-level","level":"debug"}\#n{"command":"reload"}"#.utf8),
            ]
        }
        runFuzzer { fuzzControl($0, $1) }
    }
}
