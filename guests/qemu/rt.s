# rt.s: the runtime shared by the QEMU test guests (qcounter, qudp, qdirtier).
#
# A multiboot v1 kernel for QEMU's `-kernel` (32-bit protected mode, no paging). At boot it:
#   1. checks the multiboot magic, copies the command line and the memory size out of the multiboot
#      information (before anything else can overwrite them);
#   2. loads its own GDT (flat 32-bit code/data segments at DPL0 and DPL3, and a TSS whose SS0:ESP0 is the
#      kernel stack) and an IDT (CPU exceptions 0-31 print what happened and halt);
#   3. initialises COM1 (0x3f8, 115200 8N1, no interrupts);
#   4. drops to ring 3 with IOPL=3 (port I/O allowed, interrupts off) and calls the guest's `main`.
#
# Why ring 3: on the nested KVM of the ax test machines (PVM), guest CPL0 code is emulated while CPL3 code
# can run natively. Measured there, though: without paging CPL3 is emulated too (qcounter makes the same
# ~43 000 iterations/s at CPL3 and CPL0), and turning on 32-bit paging (PSE or PAE) takes a #GP at the
# write to CR0.PG, so native speed there would need long mode. With IOPL=3, ring 3 may use `in`/`out`.
# `ring=0` on the command line keeps `main` at CPL0 instead (to measure the difference).
#
# The guest provides `main` (never returns; if it does, the guest halts) and `guest_name` (a NUL-terminated
# string used to prefix messages).
#
# Calling convention of every routine here: arguments in registers as documented; %eax, %ecx and %edx may be
# clobbered unless said otherwise; %ebx, %esi, %edi, %ebp and %esp are preserved unless used as outputs.
#
# Exported: the routines below marked `.globl`, `mem_top` (first byte above the RAM that starts at 1 MiB)
# and `cmdline` (the command line, NUL-terminated, at most CMDLINE_MAX - 1 bytes).

    .code32

    .set MB_HEADER_MAGIC, 0x1BADB002
    .set MB_HEADER_FLAGS, 0x00000002    # bit 1: the loader must fill mem_lower/mem_upper
    .set MB_BOOT_MAGIC, 0x2BADB002      # in %eax at entry
    .set MBI_FLAG_MEM, 1 << 0
    .set MBI_FLAG_CMDLINE, 1 << 2

    .set KCODE, 0x08
    .set KDATA, 0x10
    .set UCODE, 0x18 | 3
    .set UDATA, 0x20 | 3
    .set TSS_SEL, 0x28

    .set EFLAGS_USER, 0x3002            # IOPL=3, bit 1 (always 1), IF=0
    .set MSR_SYSENTER_CS, 0x174
    .set IDT_ENTRIES, 32

    .set COM1, 0x3f8
    .set CMDLINE_MAX, 1024
    .set KSTACK_SIZE, 16384
    .set USTACK_SIZE, 16384

# ---------------------------------------------------------------------------------------------------------
# Multiboot header (first in .text, see link.ld). No address fields: QEMU loads the ELF program headers.

    .section .multiboot, "a"
    .balign 4
    .long MB_HEADER_MAGIC
    .long MB_HEADER_FLAGS
    .long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

# ---------------------------------------------------------------------------------------------------------
# Entry: 32-bit protected mode, paging off, interrupts off, %eax = magic, %ebx = multiboot information.

    .section .text
    .globl _start
_start:
    cli
    cld
    movl $kstack_top, %esp
    cmpl $MB_BOOT_MAGIC, %eax
    jne not_multiboot

    # Memory size: mem_upper (KiB above 1 MiB), if the loader gave it.
    testl $MBI_FLAG_MEM, (%ebx)
    jz 1f
    movl 8(%ebx), %eax
    shll $10, %eax
    addl $0x100000, %eax
    movl %eax, mem_top
1:
    # Command line: copy at most CMDLINE_MAX - 1 bytes (cmdline is zeroed .bss, so it stays terminated).
    testl $MBI_FLAG_CMDLINE, (%ebx)
    jz 3f
    movl 16(%ebx), %esi
    movl $cmdline, %edi
    movl $CMDLINE_MAX - 1, %ecx
2:  lodsb
    testb %al, %al
    jz 3f
    stosb
    loop 2b
3:
    # TSS descriptor base (a relocated address cannot be split into bit fields by the assembler).
    movl $tss, %eax
    movw %ax, gdt + TSS_SEL + 2
    shrl $16, %eax
    movb %al, gdt + TSS_SEL + 4
    movb %ah, gdt + TSS_SEL + 7
    lgdt gdt_desc
    ljmp $KCODE, $4f
4:  movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movw $TSS_SEL, %ax
    ltr %ax

    # IDT: interrupt gates (DPL0) for the CPU exceptions.
    xorl %ecx, %ecx
5:  movl exc_stubs(,%ecx,4), %eax
    movl $0x8E00, %edx                  # present, DPL0, 32-bit interrupt gate
    call set_gate
    incl %ecx
    cmpl $32, %ecx
    jb 5b
    lidt idt_desc

    call serial_init

    # ring=3 (default) or ring=0: where `main` runs.
    movl $key_ring, %esi
    movl $3, %eax
    call arg_dec
    testl %eax, %eax
    jz 6f
    cmpl $3, %eax
    jne fatal_arg
    # Drop to ring 3 with SYSEXIT, not IRET: KVM's instruction emulator, which runs guest CPL0 code on the
    # nested KVM of the ax test machines, implements IRET in real mode only, but SYSEXIT in protected mode.
    # SYSEXIT loads CS = SYSENTER_CS + 16 and SS = SYSENTER_CS + 24 (with RPL 3): UCODE and UDATA here.
    # It leaves EFLAGS alone, so IOPL=3 is set first.
    movl $MSR_SYSENTER_CS, %ecx
    movl $KCODE, %eax
    xorl %edx, %edx
    wrmsr
    pushl $EFLAGS_USER
    popfl
    movl $user_entry, %edx              # EIP
    movl $ustack_top, %ecx              # ESP
    sysexit
6:  movl $ustack_top, %esp
    jmp main_entry

user_entry:
    movw $UDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
main_entry:
    movl $guest_name, %esi
    call puts
    movl $msg_cpl, %esi
    call puts
    movw %cs, %ax
    andl $3, %eax
    addb $'0', %al
    call putc
    movb $'\n', %al
    call putc
    call main
    jmp halt

# set_gate: IDT entry %ecx = handler %eax, type/attributes %edx (bits 8-15 of the high word).
set_gate:
    pushl %ebx
    movl %eax, %ebx
    andl $0xffff, %eax
    orl $(KCODE << 16), %eax
    andl $0xffff0000, %ebx
    orl %edx, %ebx
    movl %eax, idt(,%ecx,8)
    movl %ebx, idt+4(,%ecx,8)
    popl %ebx
    ret

not_multiboot:
    call serial_init
    movl $msg_not_multiboot, %esi
    call puts
    jmp halt_forever

# ---------------------------------------------------------------------------------------------------------
# CPU exceptions: print "<guest>: CPU exception <n> error 0x<e> at 0x<eip>" and halt.

    .macro EXC_NOERR n
exc\n: pushl $0
    pushl $\n
    jmp exc_common
    .endm
    .macro EXC_ERR n
exc\n: pushl $\n
    jmp exc_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR 8
    EXC_NOERR 9
    EXC_ERR 10
    EXC_ERR 11
    EXC_ERR 12
    EXC_ERR 13
    EXC_ERR 14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR 17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR 21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR 29
    EXC_ERR 30
    EXC_NOERR 31

exc_common:                             # stack: vector, error code, EIP, CS, EFLAGS [, ESP, SS]
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movb $'\n', %al
    call putc
    movl $guest_name, %esi
    call puts
    movl $msg_exception, %esi
    call puts
    movl 0(%esp), %eax
    xorl %edx, %edx
    call put_dec64
    movl $msg_error, %esi
    call puts
    movl 4(%esp), %eax
    call put_hex32
    movl $msg_at, %esi
    call puts
    movl 8(%esp), %eax
    call put_hex32
    movb $'\n', %al
    call putc
# halt: stops the guest for good: `hlt` with interrupts off at CPL0; at CPL3, where `hlt` is privileged,
# a `pause` loop. (Not `int` into a ring-0 gate: software interrupts from CPL3 raise #UD on the nested KVM
# of the ax test machines.)
    .globl halt
halt:
    movw %cs, %ax
    testw $3, %ax
    jz halt_forever
1:  pause
    jmp 1b
halt_forever:
    cli
1:  hlt
    jmp 1b

# ---------------------------------------------------------------------------------------------------------
# Serial port (COM1).

serial_init:
    movw $COM1 + 1, %dx                 # IER: no interrupts
    movb $0x00, %al
    outb %al, %dx
    movw $COM1 + 3, %dx                 # LCR: DLAB on
    movb $0x80, %al
    outb %al, %dx
    movw $COM1 + 0, %dx                 # divisor 1: 115200 baud
    movb $0x01, %al
    outb %al, %dx
    movw $COM1 + 1, %dx
    movb $0x00, %al
    outb %al, %dx
    movw $COM1 + 3, %dx                 # LCR: 8N1, DLAB off
    movb $0x03, %al
    outb %al, %dx
    movw $COM1 + 2, %dx                 # FCR: FIFO off
    movb $0x00, %al
    outb %al, %dx
    movw $COM1 + 4, %dx                 # MCR: DTR, RTS
    movb $0x03, %al
    outb %al, %dx
    ret

# putc: writes byte %al once the transmitter holding register is empty (bounded wait). Preserves all
# registers.
    .globl putc
putc:
    pushl %ecx
    pushl %edx
    pushl %eax
    movl $100000, %ecx
    movw $COM1 + 5, %dx                 # LSR
1:  inb %dx, %al
    testb $0x20, %al                    # THRE
    jnz 2f
    pause
    loop 1b
2:  popl %eax
    movw $COM1, %dx
    outb %al, %dx
    popl %edx
    popl %ecx
    ret

# puts: writes the NUL-terminated string at %esi. Clobbers %eax, %esi.
    .globl puts
puts:
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    jmp 1b
2:  ret

# put_dec64: writes %edx:%eax in decimal.
    .globl put_dec64
put_dec64:
    pushl %ebx
    pushl %esi
    pushl %edi
    subl $24, %esp
    leal 23(%esp), %edi
    movb $0, (%edi)
    movl %edx, %esi                     # high half
    movl %eax, %ebx                     # low half
    movl $10, %ecx
1:  xorl %edx, %edx
    movl %esi, %eax
    divl %ecx                           # high / 10; remainder carries into the low half
    movl %eax, %esi
    movl %ebx, %eax
    divl %ecx
    movl %eax, %ebx
    addb $'0', %dl
    decl %edi
    movb %dl, (%edi)
    movl %esi, %eax
    orl %ebx, %eax
    jnz 1b
    movl %edi, %esi
    call puts
    addl $24, %esp
    popl %edi
    popl %esi
    popl %ebx
    ret

# put_dec32: writes %eax in decimal.
    .globl put_dec32
put_dec32:
    xorl %edx, %edx
    jmp put_dec64

# put_line: writes "<string at %esi><%edx:%eax in decimal>\n". Clobbers %eax, %ecx, %edx, %esi.
    .globl put_line
put_line:
    pushl %eax
    call puts
    popl %eax
    call put_dec64
    movb $'\n', %al
    jmp putc

# put_hex8: writes %al as two hex digits.
    .globl put_hex8
put_hex8:
    pushl %eax
    shrb $4, %al
    call put_nibble
    popl %eax
    jmp put_nibble

put_nibble:
    andb $0x0f, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe 1f
    addb $'a' - '0' - 10, %al
1:  jmp putc

# put_hex32: writes %eax as eight hex digits.
    .globl put_hex32
put_hex32:
    pushl %ebx
    movl %eax, %ebx
    movl $4, %ecx
1:  roll $8, %ebx
    movb %bl, %al
    pushl %ecx
    call put_hex8
    popl %ecx
    loop 1b
    popl %ebx
    ret

# ---------------------------------------------------------------------------------------------------------
# Fatal errors: print "<guest>: <message>\n" and halt.

# fatal: message at %esi.
    .globl fatal
fatal:
    pushl %esi
    movl $guest_name, %esi
    call puts
    movl $msg_colon, %esi
    call puts
    popl %esi
    call puts
    movb $'\n', %al
    call putc
    jmp halt

# fatal_arg: "<guest>: bad value for <key>= on the command line", key at %esi.
    .globl fatal_arg
fatal_arg:
    pushl %esi
    movl $guest_name, %esi
    call puts
    movl $msg_bad_arg, %esi
    call puts
    popl %esi
    call puts
    movl $msg_bad_arg_end, %esi
    jmp fatal_tail

# fatal_missing: "<guest>: missing <key>= on the command line", key at %esi.
    .globl fatal_missing
fatal_missing:
    pushl %esi
    movl $guest_name, %esi
    call puts
    movl $msg_missing_arg, %esi
    call puts
    popl %esi
    call puts
    movl $msg_bad_arg_end, %esi
fatal_tail:
    call puts
    jmp halt

# ---------------------------------------------------------------------------------------------------------
# Command line: space-separated words; `key=value` words are arguments (the first occurrence of a key
# wins). QEMU passes "<kernel path> <-append string>", so the first word is the image's path.

# arg_find: looks for a word starting with "<key>=", key NUL-terminated at %esi.
# Out: CF=0 and %edi = the value's first byte, or CF=1 if there is no such word. Clobbers %eax, %ecx.
    .globl arg_find
arg_find:
    pushl %ebx
    movl $cmdline, %ebx
.Lfind_word:                            # %ebx: somewhere between words
    movb (%ebx), %al
    testb %al, %al
    jz .Lfind_none
    cmpb $' ', %al
    jne .Lfind_cmp
    incl %ebx
    jmp .Lfind_word
.Lfind_cmp:                             # %ebx: start of a word
    xorl %ecx, %ecx
1:  movb (%esi,%ecx), %al
    testb %al, %al
    jz 2f
    cmpb (%ebx,%ecx), %al
    jne .Lfind_skip
    incl %ecx
    jmp 1b
2:  cmpb $'=', (%ebx,%ecx)
    jne .Lfind_skip
    leal 1(%ebx,%ecx), %edi
    popl %ebx
    clc
    ret
.Lfind_skip:                            # to the end of this word
    movb (%ebx), %al
    testb %al, %al
    jz .Lfind_none
    cmpb $' ', %al
    je .Lfind_word
    incl %ebx
    jmp .Lfind_skip
.Lfind_none:
    popl %ebx
    stc
    ret

# parse_dec: an unsigned decimal number (u32) at %edi. Out: %eax, %edi past its digits; CF=1 if there is
# no digit or the number does not fit 32 bits. Clobbers %ecx, %edx.
    .globl parse_dec
parse_dec:
    pushl %ebx
    pushl %esi
    xorl %eax, %eax
    movl %edi, %esi
1:  movzbl (%edi), %ebx
    subl $'0', %ebx
    cmpl $9, %ebx
    ja 2f
    movl $10, %ecx
    mull %ecx
    jc 3f
    addl %ebx, %eax
    jc 3f
    incl %edi
    jmp 1b
2:  cmpl %esi, %edi
    je 3f
    popl %esi
    popl %ebx
    clc
    ret
3:  popl %esi
    popl %ebx
    stc
    ret

# parse_hex8: one or two hex digits at %edi. Out: %al, %edi past them; CF=1 if there is no hex digit.
# Clobbers %ecx, %edx.
parse_hex8:
    xorl %edx, %edx                     # value
    xorl %ecx, %ecx                     # digits
1:  movzbl (%edi), %eax
    cmpb $'0', %al
    jb 3f
    cmpb $'9', %al
    jbe 2f
    orb $0x20, %al                      # lower case
    cmpb $'a', %al
    jb 3f
    cmpb $'f', %al
    ja 3f
    subb $'a' - '0' - 10, %al
2:  subb $'0', %al
    shll $4, %edx
    orl %eax, %edx
    incl %edi
    incl %ecx
    cmpl $2, %ecx
    jb 1b
3:  movl %edx, %eax
    cmpl $1, %ecx                       # CF=1 iff no digit
    ret

# at_word_end: ZF=1 iff (%edi) ends a word (space or NUL).
at_word_end:
    cmpb $' ', (%edi)
    je 1f
    cmpb $0, (%edi)
1:  ret

# arg_dec: the u32 value of <key>= (key at %esi), or the default %eax if absent. A malformed value is
# fatal. Out: %eax.
    .globl arg_dec
arg_dec:
    pushl %edi
    pushl %eax
    call arg_find
    jc 1f
    call parse_dec
    jc fatal_arg
    call at_word_end
    jne fatal_arg
    addl $4, %esp
    popl %edi
    ret
1:  popl %eax
    popl %edi
    ret

# arg_ipv4: the IPv4 address of <key>= (key at %esi, "a.b.c.d"). Out: CF=0 and %eax = the four bytes in
# network order (store %eax to memory to get a, b, c, d), or CF=1 if absent. A malformed value is fatal.
    .globl arg_ipv4
arg_ipv4:
    pushl %edi
    pushl %ebx
    pushl %ebp
    call arg_find
    jc 3f
    xorl %ebx, %ebx
    movl $4, %ebp
1:  call parse_dec
    jc fatal_arg
    cmpl $255, %eax
    ja fatal_arg
    shrl $8, %ebx                       # after four parts the first one is in the low byte
    shll $24, %eax
    orl %eax, %ebx
    decl %ebp
    jz 2f
    cmpb $'.', (%edi)
    jne fatal_arg
    incl %edi
    jmp 1b
2:  call at_word_end
    jne fatal_arg
    movl %ebx, %eax
    popl %ebp
    popl %ebx
    popl %edi
    clc
    ret
3:  popl %ebp
    popl %ebx
    popl %edi
    stc
    ret

# arg_mac: the MAC address of <key>= (key at %esi, "aa:bb:cc:dd:ee:ff") stored at %ebx (6 bytes).
# Out: CF=0, or CF=1 if absent (nothing stored). A malformed value is fatal.
    .globl arg_mac
arg_mac:
    pushl %edi
    pushl %ebp
    call arg_find
    jc 3f
    xorl %ebp, %ebp
1:  call parse_hex8
    jc fatal_arg
    movb %al, (%ebx,%ebp)
    incl %ebp
    cmpl $6, %ebp
    je 2f
    cmpb $':', (%edi)
    jne fatal_arg
    incl %edi
    jmp 1b
2:  call at_word_end
    jne fatal_arg
    popl %ebp
    popl %edi
    clc
    ret
3:  popl %ebp
    popl %edi
    stc
    ret

# ---------------------------------------------------------------------------------------------------------

    .section .rodata
key_ring:           .asciz "ring"
msg_cpl:            .asciz ": running at CPL"
msg_not_multiboot:  .asciz "not started by a multiboot loader (no 0x2BADB002 in eax)\n"
msg_exception:      .asciz ": CPU exception "
msg_error:          .asciz " error 0x"
msg_at:             .asciz " at eip 0x"
msg_colon:          .asciz ": "
msg_bad_arg:        .asciz ": bad value for "
msg_missing_arg:    .asciz ": missing "
msg_bad_arg_end:    .asciz "= on the command line\n"

    .balign 4
exc_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long exc\n
    .endr

    .section .data
    .balign 8
gdt:
    .quad 0                             # null
    .quad 0x00CF9A000000FFFF            # 0x08 KCODE: base 0, limit 4 GiB, 32-bit, execute/read, DPL0
    .quad 0x00CF92000000FFFF            # 0x10 KDATA: base 0, limit 4 GiB, read/write, DPL0
    .quad 0x00CFFA000000FFFF            # 0x18 UCODE: as KCODE, DPL3
    .quad 0x00CFF2000000FFFF            # 0x20 UDATA: as KDATA, DPL3
    .quad 0x0000890000000067            # 0x28 TSS: limit 103, available 32-bit TSS, DPL0; base set at boot
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
idt_desc:
    .word IDT_ENTRIES * 8 - 1
    .long idt

    .balign 4
tss:
    .long 0                             # previous task link
    .long kstack_top                    # ESP0: the stack for interrupts and exceptions from ring 3
    .long KDATA                         # SS0
    .fill 22, 4, 0                      # ESP1 .. LDT selector (unused)
    .word 0                             # trap flag
    .word 104                           # I/O map base beyond the limit: no bitmap (IOPL=3 allows all ports)

    .globl mem_top
mem_top:
    .long 0x100000                      # 1 MiB until the loader says more

    .section .bss
idt:
    .skip IDT_ENTRIES * 8
    .globl cmdline
cmdline:
    .skip CMDLINE_MAX
    .balign 16
kstack:
    .skip KSTACK_SIZE
kstack_top:
ustack:
    .skip USTACK_SIZE
ustack_top:
