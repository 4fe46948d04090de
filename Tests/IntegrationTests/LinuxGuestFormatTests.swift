import EmulatedGuests
import Testing

extension Integration {
    /// What the Linux guest prints and what VM2 sends it: the console report
    /// parses, and the datagram VM2 generates is one the guest's stack takes
    /// (IPv4 header checksum right, addressed to its MAC, IP and port) and
    /// `udp-receiver` counts as valid.
    @Suite struct LinuxGuestFormat {
        @Test func aReceiveReportParses() throws {
            // As QEMU's serial console prints it: "\r\n" (one Character in
            // Swift, so splitting on "\n" finds no line at all), and a "("
            // earlier in the boot log.
            let output = ["Probing EDD (edd=off to disable)... ok", "vpb-receiving on 9999",
                          "vpb-received 372938 datagrams (372930 valid, 3 corrupt, 5 other) in 4.998 s: 74623 pps",
                          "vpb-guest rx_packets 372950 rx_dropped 7", "vpb-guest dmar faults 0", "vpb-guest done"].joined(separator: "\r\n")
            let r = try #require(LinuxGuest.report(in: output))
            #expect(r.received == 372938 && r.valid == 372930 && r.corrupt == 3 && r.other == 5)
            #expect(r.receivedPerSecond == 74623 && r.rxPackets == 372950 && r.rxDropped == 7 && r.sent == 0)
        }

        @Test(arguments: [12, 512, 1472])
        func vm2sDatagramIsOneTheGuestTakes(size: Int) {
            let f = LinuxGuest.datagramFrame(size: size, sequence: 3)
            #expect(f.count == 12 + 14 + 20 + 8 + size)
            #expect(f[10] == 1, "num_buffers 1")
            let eth = Array(f[12..<26]), ip = Array(f[26..<46]), udp = Array(f[46..<54]), payload = Array(f[54...])
            #expect(eth[0..<6] == [0x52, 0x54, 0x00, 0x00, 0x00, 0x01][...] && eth[12] == 0x08 && eth[13] == 0x00)
            var sum: UInt32 = 0
            for i in stride(from: 0, to: 20, by: 2) { sum += UInt32(ip[i]) << 8 | UInt32(ip[i + 1]) }
            while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
            #expect(sum == 0xffff, "the IPv4 header checksum verifies")
            #expect(Int(ip[2]) << 8 | Int(ip[3]) == 28 + size && ip[9] == 17 && Array(ip[16..<20]) == LinuxGuest.guestIP)
            #expect(Int(udp[2]) << 8 | Int(udp[3]) == Int(LinuxGuest.port) && Int(udp[4]) << 8 | Int(udp[5]) == 8 + size)
            // udp-receiver's rule: magic "VPBG", sequence, size, then (sequence * 7 + i) & 0xff.
            #expect(Array(payload[0..<4]) == Array("VPBG".utf8) && payload[4] == 3 && Int(payload[8]) | Int(payload[9]) << 8 == size)
            #expect((12..<size).allSatisfy { payload[$0] == UInt8((3 * 7 + $0) & 0xff) })
        }
    }
}
