import BridgeCore
import Logging
import PeerProtocol

/// VM2's translation requests (like ATS): `TranslationBroker` (pure) decides;
/// this carries out what it says — MAPs, answers on the asking connection
/// only, IOTLB misses toward VM1 — and counts and throttles refusals.
extension VhostUserConnection {
    /// VM2 asks for a translation (like ATS); `TranslationBroker` decides.
    func translate(_ request: PeerTranslate, generation: Int, now: ContinuousClock.Instant = .now) {
        let asked = TranslationRequest(id: request.requestID, bus: BusAddress(request.barOffset), length: request.length,
                                       access: request.access)
        carryOut(translations.request(asked, owner: generation, space: session.addressSpace,
                                      canRaiseMisses: session.hasBackendChannel && session.iommuPlatform, now: now), now: now)
    }

    /// After a grant (IOTLB update, operator map): answer what it satisfied.
    func settleTranslations(now: ContinuousClock.Instant = .now) {
        carryOut(translations.settle(space: session.addressSpace, ringNeeds: session.ringTranslationsNeeded(), now: now), now: now)
    }

    /// Refuses translations whose deadline passed, raises again the misses
    /// whose retry interval passed; returns when to call again.
    /// `changed`: something was answered or raised (the live view is stale).
    func expireTranslations(now: ContinuousClock.Instant) -> (changed: Bool, next: ContinuousClock.Instant?) {
        let (actions, next) = translations.expire(space: session.addressSpace, ringNeeds: session.ringTranslationsNeeded(), now: now)
        carryOut(actions, now: now)
        return (!actions.isEmpty, next)
    }

    /// VM2 connection `generation` is gone: its waiting translations have
    /// nobody to answer.
    func dropTranslations(of generation: Int) {
        carryOut(translations.drop(owner: generation, space: session.addressSpace, ringNeeds: session.ringTranslationsNeeded(),
                                   now: .now), now: .now)
    }

    func carryOut(_ actions: [TranslationBroker.Action], now: ContinuousClock.Instant) {
        var withheld: [(start: UInt64, end: UInt64)] = [] // unsealed memory VM2 is not sent
        for action in actions {
            switch action {
            case .sendMaps(let pieces, let owner):
                for p in pieces {
                    if mirror.withholds(p.region) { withheld.append((p.bus.rawValue, p.bus.rawValue &+ p.length)) }
                    _ = mirror.sendMap(bus: p.bus, length: p.length, permission: p.permission, region: p.region, fdOffset: p.fdOffset,
                                generation: owner)
                }
            case .answer(let ids, let request, let owner, var verdict):
                if case .granted = verdict, withheld.contains(where: { $0.start < request.bus.rawValue &+ request.length && request.bus.rawValue < $0.end }) {
                    verdict = .refused(reason: "[unsealed-region] VM1's memory there is not sealed against shrinking (see unsealed-regions)", rule: "unsealed-region")
                }
                answer(ids, request, owner: owner, verdict, now: now)
            case .raiseMiss(let bus, let permission):
                if case .sendBackend(let bytes)? = session.missMessage(bus: bus, permission: permission) {
                    sendBackend(bytes)
                    if missRaisedAt == nil { missRaisedAt = now }
                }
            }
        }
    }

    /// Answers request `ids` (all for the same range) on VM2 connection
    /// `owner` only: a reply never reaches a VM2 that did not ask. Refusals
    /// are counted by rule and logged through the throttle.
    func answer(_ ids: [UInt64], _ request: TranslationRequest, owner: Int, _ verdict: TranslationBroker.Verdict,
                        now: ContinuousClock.Instant) {
        let status: TranslateStatus, reason: String
        switch verdict {
        case .granted:
            (status, reason) = (.granted, "")
            peer.count { $0.translationsGranted += ids.count }
        case .refused(let why, let rule):
            (status, reason) = (.refused, why)
            noteRefusal(ids.count, request, rule: rule, reason: why, now: now)
        case .timedOut:
            (status, reason) = (.timedOut, "VM1 did not answer the IOTLB miss in time")
            noteRefusal(ids.count, request, rule: "translation-timeout", reason: reason, now: now)
        }
        for id in ids {
            peer.send(.translateReply(PeerTranslateReply(requestID: id, status: status, reason: reason)), generation: owner)
        }
    }

    func noteRefusal(_ count: Int, _ request: TranslationRequest, rule: String, reason: String, now: ContinuousClock.Instant) {
        peer.count { $0.translationsRefused += count; $0.refusals[rule, default: 0] += count }
        if let held = refusalLog.admit(rule, now: now) {
            logger.info("VM2 translation \(request.bus)+\(Hex(request.length)) \(request.access) refused: \(reason)\(held > 0 ? " (\(held) more [\(rule)] refusals not logged)" : "")",
                        metadata: ["rule": "\(rule)"])
        }
    }
}
