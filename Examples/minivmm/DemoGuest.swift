/// The bundled demo guest: `Resources/hello.elf`, a copy of `Guests/hello.elf`
/// kept identical by `make -C Guests` (and checked by `make -C Guests check`).
///
/// SwiftPM's `embedInCode` resource rule compiles the file's bytes into the
/// executable, so there is no resource bundle to find at run time: `swift run
/// minivmm` works from any directory, and so does a statically linked minivmm
/// (`--static-swift-stdlib`) copied anywhere. (`Bundle.module` would need
/// Foundation and a `.resources` directory beside the executable.)
let demoGuestImage: [UInt8] = PackageResources.hello_elf
