"""A 64 KiB x86 BIOS image whose only job is to echo COM1: every byte read is written back.

With QEMU ``-bios <image> -chardev spiceport,id=x,name=N -device isa-serial,chardev=x`` this gives
a SPICE port that echoes without a guest OS or disk: bytes a client writes to port N arrive at the
16550 UART's receiver, the CPU copies them to the transmitter, QEMU sends them back to the client.

The code is hand-assembled 16-bit real-mode machine code (encodings in the comments).  The image
is loaded by QEMU at physical 0xF0000-0xFFFFF (and aliased below 4 GiB); the CPU starts at
F000:FFF0 (image offset 0xFFF0), where a far jump goes to F000:0000, the start of the code.

    python tests/peers/echo_bios.py out.bin      # write the image
"""

from __future__ import annotations

import sys

IMAGE_SIZE = 0x10000
RESET_OFFSET = 0xFFF0
CODE_SEGMENT = 0xF000
CODE_OFFSET = 0x0000

COM1 = 0x3F8
RBR = THR = DLL = COM1 + 0  # receive buffer / transmit holding / divisor latch low (DLAB=1)
IER = DLM = COM1 + 1        # interrupt enable / divisor latch high (DLAB=1)
FCR = COM1 + 2              # FIFO control (write)
LCR = COM1 + 3              # line control
MCR = COM1 + 4              # modem control
LSR = COM1 + 5              # line status
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20


class _Asm:
    """Just enough of an assembler: emits bytes, resolves rel8 jumps to labels."""

    def __init__(self):
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []  # (offset of the rel8 byte, label)

    def emit(self, *b: int) -> None:
        self.code += bytes(b)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def cli(self):                       # FA            cli
        self.emit(0xFA)

    def cld(self):                       # FC            cld
        self.emit(0xFC)

    def mov_dx(self, imm16: int):        # BA iw         mov dx, imm16
        self.emit(0xBA, imm16 & 0xFF, imm16 >> 8)

    def mov_al(self, imm8: int):         # B0 ib         mov al, imm8
        self.emit(0xB0, imm8)

    def out_dx_al(self):                 # EE            out dx, al
        self.emit(0xEE)

    def in_al_dx(self):                  # EC            in al, dx
        self.emit(0xEC)

    def test_al(self, imm8: int):        # A8 ib         test al, imm8
        self.emit(0xA8, imm8)

    def mov_ah_al(self):                 # 88 C4         mov ah, al  (88 /r, modrm 11 000 100)
        self.emit(0x88, 0xC4)

    def mov_al_ah(self):                 # 88 E0         mov al, ah  (88 /r, modrm 11 100 000)
        self.emit(0x88, 0xE0)

    def jz(self, label: str):            # 74 cb         jz rel8
        self.emit(0x74, 0)
        self.fixups.append((len(self.code) - 1, label))

    def jmp(self, label: str):           # EB cb         jmp rel8
        self.emit(0xEB, 0)
        self.fixups.append((len(self.code) - 1, label))

    def outb(self, port: int, value: int):
        self.mov_dx(port)
        self.mov_al(value)
        self.out_dx_al()

    def assemble(self) -> bytes:
        for at, name in self.fixups:
            rel = self.labels[name] - (at + 1)  # relative to the end of the 2-byte instruction
            if not -128 <= rel <= 127:
                raise ValueError(f"jump to {name} out of rel8 range ({rel})")
            self.code[at] = rel & 0xFF
        return bytes(self.code)


def echo_code() -> bytes:
    a = _Asm()
    a.cli()                          # no interrupts: there is no IVT, we poll
    a.cld()
    # --- 16550 setup: 115200 baud (divisor 1), 8N1, FIFOs on and cleared, no UART interrupts
    a.outb(IER, 0x00)                # IER = 0: all UART interrupts off
    a.outb(LCR, 0x80)                # LCR.DLAB = 1: DLL/DLM visible
    a.outb(DLL, 0x01)                # divisor low = 1
    a.outb(DLM, 0x00)                # divisor high = 0
    a.outb(LCR, 0x03)                # DLAB = 0, 8 data bits, no parity, 1 stop bit
    a.outb(FCR, 0x07)                # FIFO enable | clear RX FIFO | clear TX FIFO (trigger 1)
    a.outb(MCR, 0x03)                # DTR | RTS (OUT2 off: no IRQ line; loopback bit 4 off)
    # --- echo loop
    a.label("rx_wait")
    a.mov_dx(LSR)
    a.in_al_dx()                     # al = LSR
    a.test_al(LSR_DATA_READY)
    a.jz("rx_wait")                  # nothing received yet
    a.mov_dx(RBR)
    a.in_al_dx()                     # al = received byte
    a.mov_ah_al()                    # keep it in ah
    a.label("tx_wait")
    a.mov_dx(LSR)
    a.in_al_dx()
    a.test_al(LSR_THR_EMPTY)
    a.jz("tx_wait")                  # transmitter still busy
    a.mov_dx(THR)
    a.mov_al_ah()
    a.out_dx_al()                    # send the byte back
    a.jmp("rx_wait")
    return a.assemble()


def build() -> bytes:
    """The 64 KiB image: code at offset 0, far jump at the reset vector, 0xFF elsewhere."""
    img = bytearray(b"\xFF" * IMAGE_SIZE)
    code = echo_code()
    img[CODE_OFFSET:CODE_OFFSET + len(code)] = code
    # EA iw iw: jmp far ptr16:16  ->  jmp F000:0000
    jmp_far = bytes([0xEA, CODE_OFFSET & 0xFF, CODE_OFFSET >> 8,
                     CODE_SEGMENT & 0xFF, CODE_SEGMENT >> 8])
    img[RESET_OFFSET:RESET_OFFSET + len(jmp_far)] = jmp_far
    assert len(img) == IMAGE_SIZE
    return bytes(img)


def write(path: str) -> str:
    with open(path, "wb") as f:
        f.write(build())
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: echo_bios.py OUTPUT.bin")
    write(sys.argv[1])
