import BridgeCore
import FuzzSupport
import PeerProtocol

/// The peer protocol's decoder and the daemon's translation state
/// (`TranslationBroker` over an iommu `AddressSpace`) driven by a sequence of
/// VM2 messages interleaved with VM1's IOTLB updates and invalidates, VM2
/// disconnects, a session end and the passing of time.
///
/// Invariants: a decoded message re-encodes to something that decodes to
/// the same message; every request is answered at most once, only on the
/// connection that asked; "granted" only when the range is accessible right
/// then; never more waiting requests than the capacity.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPeer(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let page: UInt64 = 4096
    var space = try! AddressSpace(AddressSpaceConfiguration(barSize: 1 << 32, mode: .iommu))
    var regions = MemoryRegionTable(maxRegions: 8)
    guard let ram = try? regions.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 1 << 28,
                                                      userAddress: FrontendUserAddress(0x7f00_0000_0000), mmapOffset: 0),
                                     fileSize: 1 << 28) else { fuzzFailure("fixture region refused") }
    let capacity = Int(input.byte() % 8) + 1
    var broker = TranslationBroker(capacity: capacity, pageSize: page, deadline: .milliseconds(500), missRetryInterval: .seconds(1))
    var now = ContinuousClock.now
    var asked: [UInt64: Int] = [:]     // request id → owner
    var answered: Set<UInt64> = []
    var steps = 0

    func check(_ actions: [TranslationBroker.Action], space: AddressSpace) {
        for action in actions {
            guard case .answer(let ids, let request, let owner, let verdict) = action else { continue }
            for id in ids {
                guard let asker = asked[id] else { fuzzFailure("answer to id \(id) nobody asked") }
                guard asker == owner else { fuzzFailure("id \(id) of connection \(asker) answered on \(owner)") }
                guard answered.insert(id).inserted else { fuzzFailure("id \(id) answered twice") }
            }
            if verdict == .granted,
               (try? space.checkAccess(request.bus, length: request.length, needed: request.access, purpose: .translation)) == nil {
                fuzzFailure("granted \(request.bus)+\(request.length) \(request.access), which is not accessible")
            }
        }
        if broker.pending.count > broker.pending.capacity { fuzzFailure("\(broker.pending.count) waiting, capacity \(capacity)") }
    }

    while !input.isEmpty, steps < 256 {
        steps += 1
        let op = input.byte()
        switch op % 6 {
        case 0, 1:
            let head = input.take(PeerCodec.headerSize)
            guard let (header, type) = try? PeerCodec.validate(header: head) else { continue }
            let payload = input.take(Int(header.size))
            guard let message = try? PeerCodec.decode(header, type, payload: payload, fdCount: Int(op >> 6)) else { continue }
            let again = PeerCodec.encode(message)
            guard let (h2, t2) = try? PeerCodec.validate(header: Array(again.prefix(PeerCodec.headerSize))),
                  let m2 = try? PeerCodec.decode(h2, t2, payload: Array(again.dropFirst(PeerCodec.headerSize)), fdCount: message.fdCount),
                  m2 == message else { fuzzFailure("\(type) does not survive encode → decode") }
            if case .translate(let t) = message {
                let owner = Int(op >> 3) & 1
                guard asked[t.requestID] == nil else { continue } // ids are unique per connection in the daemon's use
                asked[t.requestID] = owner
                let request = TranslationRequest(id: t.requestID, bus: BusAddress(t.barOffset), length: t.length, access: t.access)
                check(broker.request(request, owner: owner, space: space, canRaiseMisses: op & 4 != 0, now: now), space: space)
            }
        case 2:
            let bus = UInt64(input.u16()) * page
            let length = UInt64(input.byte() % 16 + 1) * page
            let offset = UInt64(input.u16() % 0x1000) * page
            let perm = Permission(rawValue: input.byte() % 4)
            if (try? space.update(bus: BusAddress(bus), length: length, source: .user(FrontendUserAddress(ram.userAddress.rawValue + offset)),
                                  permission: perm, regions: regions)) != nil {
                check(broker.settle(space: space, ringNeeds: [], now: now), space: space)
            }
        case 3:
            let bus = UInt64(input.u16()) * page
            _ = try? space.invalidate(bus: BusAddress(bus), length: UInt64(input.byte()) * page)
            check(broker.settle(space: space, ringNeeds: [], now: now), space: space)
        case 4:
            now = now.advanced(by: .milliseconds(Int(input.byte()) * 10))
            check(broker.expire(space: space, ringNeeds: [], now: now).actions, space: space)
        default:
            if op & 8 != 0 {
                check(broker.endSession(), space: space)
            } else {
                let owner = Int(op >> 4) & 1
                check(broker.drop(owner: owner, space: space, ringNeeds: [], now: now), space: space)
                for (id, o) in asked where o == owner { answered.insert(id) } // dropped: never answered now
            }
        }
        if let v = space.invariantViolation() { fuzzFailure(v) }
    }
    return 0
}
