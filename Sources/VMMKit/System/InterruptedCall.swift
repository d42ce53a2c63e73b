/// Retrying a system call that a signal interrupted.
package enum InterruptedCall {
    /// Runs `body`; while it fails with `EINTR`, runs it again, at most
    /// `retries` more times, then lets the `EINTR` through.
    package static func retrying<R>(_ retries: Int, _ body: () throws(BackendError) -> R) throws(BackendError) -> R {
        var attempt = 0
        while true {
            do throws(BackendError) {
                return try body()
            } catch where error.errno == .interrupted && attempt < retries {
                attempt += 1
            }
        }
    }
}
