import FuzzSupport

@main
enum FuzzAddressSpace {
    static func main() {
        writeSeedsIfAsked {
            [
                // update 4 pages at page 2 from region offset 0 rw; invalidate 1 page at page 3
                "iommu-update-invalidate": [0, 0, 2, 4, 0, 3, 5, 3, 1],
                // static: two updates in the windows, freeze, an update refused, an invalidate
                "static-freeze": [1, 0, 20, 4, 0, 3, 1, 82, 2, 5, 1, 7, 0, 0, 0, 20, 1, 0, 3, 6, 21, 1],
            ]
        }
        runFuzzer { fuzzAddressSpace($0, $1) }
    }
}
