import Glibc

/// Starts a joinable OS thread running `body` (vCPU threads).
///
/// The thread drops `body` (and what it captured) as soon as `body` returns,
/// so a finished thread keeps nothing alive; whoever owns the `OSThread`
/// then joins it, or ``joinOrDetach()`` reclaims it from a deinitializer.
final class OSThread: @unchecked Sendable {
    private var handle = pthread_t()
    private var body: (() -> Void)?

    private init(body: @escaping () -> Void) { self.body = body }

    static func start(_ body: @escaping () -> Void) throws(BackendError) -> OSThread {
        let t = OSThread(body: body)
        let unmanaged = Unmanaged.passRetained(t)
        let r = pthread_create(&t.handle, nil, { arg in
            guard let arg else { return nil }
            let t = Unmanaged<OSThread>.fromOpaque(arg).takeRetainedValue()
            t.runBody()
            return nil
        }, unmanaged.toOpaque())
        if r != 0 {
            unmanaged.release()
            throw BackendError("pthread_create", errno: Errno(rawValue: r))
        }
        return t
    }

    private func runBody() {
        if let b = body { b() }
        body = nil // may release the last reference to the VM: its deinit then runs on this thread
    }

    func join() { pthread_join(handle, nil) }

    /// Joins the thread, or detaches it when called on the thread itself
    /// (a deinitializer that runs there: the thread is about to end).
    func joinOrDetach() {
        if pthread_equal(handle, pthread_self()) != 0 { pthread_detach(handle) } else { pthread_join(handle, nil) }
    }
}
