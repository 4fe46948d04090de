import BridgeCore
import FuzzSupport
import PeerProtocol

@main
enum FuzzPeer {
    static func main() {
        writeSeedsIfAsked(seeds)
        runFuzzer { fuzzPeer($0, $1) }
    }

    static func seeds() -> [String: [UInt8]] {
        let translate = [0x00] + PeerCodec.encode(.translate(PeerTranslate(requestID: 1, barOffset: 0x10000, length: 0x1000, access: .read)))
        let translateAsk = [0x04] + PeerCodec.encode(.translate(PeerTranslate(requestID: 2, barOffset: 0x20000, length: 0x2000, access: .write)))
        let update: [UInt8] = [0x02, 0x10, 0x00, 0x02, 0x00, 0x00, 0x03]   // VM1 maps 2 pages at 0x10000
        let update2: [UInt8] = [0x02, 0x20, 0x00, 0x02, 0x10, 0x00, 0x03]
        let later: [UInt8] = [0x04, 0x40]
        return [
            "hello": [0x00] + PeerCodec.encode(.hello(PeerHello(features: .all, deviceFeatures: [.version1, .eventIdx]))),
            "ack-and-stop": [0x00] + PeerCodec.encode(.ack(3)) + [0x00] + PeerCodec.encode(.vringStopped(index: 1, lastAvail: 7)),
            "translate-then-map": [0x03] + translate + translateAsk + update + update2 + later,
            "translate-then-drop": [0x03] + translateAsk + [0x05] + later + [0x0d],
        ]
    }
}
