/// Where an emitted fast-path body lies, for the planner and for charging exits to sites.
package struct FastPathBody: Hashable, Sendable {
    /// The body's guest-virtual range (it falls through at `range.upperBound`).
    package var range: Range<UInt64>
    /// The relocated original instruction inside the body (the fallback): an exit
    /// whose RIP is in or just past this range was taken from the body and belongs to its site.
    package var fallback: Range<UInt64>
    /// Bytes of stack the body uses below the red zone (pushed flags and registers).
    package var stackBytes: Int
}
