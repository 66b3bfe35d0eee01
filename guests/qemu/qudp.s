# qudp.s: sends a sequence-numbered UDP/IPv4 stream through an e1000 NIC and prints the sequence numbers.
#
# Command line (QEMU -append):
#   src=A.B.C.D          source IPv4 address (required)
#   dst=A.B.C.D          destination IPv4 address (required)
#   dmac=aa:bb:cc:dd:ee:ff  destination MAC (default ff:ff:ff:ff:ff:ff)
#   port=P               destination UDP port (default 5555); sport=P source port (default: port)
#   rate=R               packets per second, paced by polling the PIT (default 100; 0 = no pacing)
#   size=S               UDP payload bytes, 8..1472 (default 64)
#   print=K              print "seq N" every K packets (default 1; 0 = never)
#   count=N              stop after N packets: print "qudp: done N" and halt (default 0 = forever)
#   ring=0               run at CPL0 instead of CPL3 (see rt.s)
#
# Packet n (n = 1, 2, ...): Ethernet dst = dmac, src = the e1000's MAC (RAL0/RAH0, as QEMU's mac= set it),
# type 0x0800; IPv4 version 4, IHL 5, TOS 0, total length 28 + S, ID = n mod 65536, DF, TTL 64, protocol
# 17, header checksum computed; UDP sport, dport, length 8 + S, checksum 0 (none); payload: bytes 0-7 = n
# as a big-endian u64, byte k (8 <= k < S) = (n + k) mod 256. Frames shorter than 60 bytes are padded with
# zeros. The contents depend on n and the arguments only; the PIT only sets when a packet leaves.
#
# The e1000 (PCI 8086:100E) is found on PCI bus 0 through configuration ports 0xCF8/0xCFC; its BAR0 (MMIO,
# assigned by the firmware) is used as plain memory. Memory space and bus mastering are enabled, the NIC is
# reset, interrupts masked, and an 8-descriptor legacy transmit ring set up (TDBAL/TDLEN/TDH/TDT, TIPG,
# TCTL.EN|PSP). Each packet goes in the next descriptor's own 2 KiB buffer (EOP|IFCS|RS); a descriptor is
# reused once the NIC has set its DD bit. Nothing is received.

    .code32
    .globl main, guest_name

    .set PCI_ADDR, 0xcf8
    .set PCI_DATA, 0xcfc
    .set E1000_ID, 0x100E8086
    .set REG_CTRL, 0x0000
    .set REG_IMC, 0x00D8
    .set REG_TCTL, 0x0400
    .set REG_TIPG, 0x0410
    .set REG_TDBAL, 0x3800
    .set REG_TDBAH, 0x3804
    .set REG_TDLEN, 0x3808
    .set REG_TDH, 0x3810
    .set REG_TDT, 0x3818
    .set REG_RAL0, 0x5400
    .set REG_RAH0, 0x5404
    .set CTRL_RST, 1 << 26
    .set TCTL_VALUE, (1 << 1) | (1 << 3) | (0x0F << 4) | (0x40 << 12)   # EN, PSP, CT, COLD
    .set TIPG_VALUE, 10 | (8 << 10) | (6 << 20)
    .set RING, 8
    .set BUF_SIZE, 2048
    .set TX_CMD, 0x0B000000             # EOP | IFCS | RS in the command byte
    .set PIT_HZ, 1193182
    .set MAX_WAIT, 10000000

    .section .text
main:
    # Arguments.
    movl $key_src, %esi
    call arg_ipv4
    jc fatal_missing
    movl %eax, src_ip
    movl $key_dst, %esi
    call arg_ipv4
    jc fatal_missing
    movl %eax, dst_ip
    movl $key_dmac, %esi
    movl $dmac, %ebx
    call arg_mac
    movl $key_port, %esi
    movl $5555, %eax
    call arg_dec
    cmpl $65535, %eax
    ja fatal_arg
    movl %eax, dport
    movl $key_sport, %esi
    call arg_dec                        # default: port
    cmpl $65535, %eax
    ja fatal_arg
    movl %eax, sport
    movl $key_rate, %esi
    movl $100, %eax
    call arg_dec
    cmpl $100000, %eax
    ja fatal_arg
    movl %eax, rate
    movl $key_size, %esi
    movl $64, %eax
    call arg_dec
    cmpl $8, %eax
    jb fatal_arg
    cmpl $1472, %eax
    ja fatal_arg
    movl %eax, size
    movl $key_print, %esi
    movl $1, %eax
    call arg_dec
    movl %eax, print_every
    movl %eax, print_countdown
    movl $key_count, %esi
    xorl %eax, %eax
    call arg_dec
    movl %eax, count

    call e1000_find
    call e1000_init
    call print_setup

    cmpl $0, rate
    je 1f
    movl $PIT_HZ, %eax                  # ticks between packets
    xorl %edx, %edx
    divl rate
    movl %eax, interval
    call pit_init
    call pit_elapsed
    movl %eax, deadline
1:

.Lpacket:
    addl $1, seq
    adcl $0, seq + 4
    call send_packet
    cmpl $0, print_every
    je 2f
    decl print_countdown
    jnz 2f
    movl print_every, %eax
    movl %eax, print_countdown
    movl $msg_seq, %esi
    movl seq, %eax
    movl seq + 4, %edx
    call put_line
2:  cmpl $0, count
    je 3f
    movl seq, %eax
    cmpl count, %eax
    jne 3f
    cmpl $0, seq + 4
    jne 3f
    movl $msg_done, %esi
    xorl %edx, %edx
    call put_line
    jmp halt
3:  cmpl $0, rate
    je .Lpacket
    call pace
    jmp .Lpacket

# ---------------------------------------------------------------------------------------------------------
# PCI and the e1000.

# pci_read: configuration dword at address %eax (0x80000000 | bus<<16 | dev<<11 | fn<<8 | reg). Out: %eax.
pci_read:
    movw $PCI_ADDR, %dx
    outl %eax, %dx
    movw $PCI_DATA, %dx
    inl %dx, %eax
    ret

# pci_write: writes %ecx to configuration dword %eax.
pci_write:
    movw $PCI_ADDR, %dx
    outl %eax, %dx
    movw $PCI_DATA, %dx
    movl %ecx, %eax
    outl %eax, %dx
    ret

# e1000_find: finds the first 8086:100E function 0 on bus 0; sets pci_dev (config address) and mmio.
e1000_find:
    movl $0x80000000, %ebx
1:  movl %ebx, %eax
    call pci_read
    cmpl $E1000_ID, %eax
    je 2f
    addl $1 << 11, %ebx
    cmpl $0x80010000, %ebx
    jb 1b
    movl $msg_no_e1000, %esi
    jmp fatal
2:  movl %ebx, pci_dev
    leal 0x10(%ebx), %eax               # BAR0
    call pci_read
    testl $1, %eax
    jnz 3f                              # an I/O BAR
    andl $0xfffffff0, %eax
    jz 3f                               # not assigned
    movl %eax, mmio
    leal 0x04(%ebx), %eax               # command register: memory space + bus master
    call pci_read
    orl $0x6, %eax
    movl %eax, %ecx
    leal 0x04(%ebx), %eax
    call pci_write
    ret
3:  movl $msg_bad_bar, %esi
    jmp fatal

# e1000_init: reset, source MAC, transmit ring.
e1000_init:
    movl mmio, %ebx
    movl REG_CTRL(%ebx), %eax
    orl $CTRL_RST, %eax
    movl %eax, REG_CTRL(%ebx)
    movl $MAX_WAIT, %ecx
1:  testl $CTRL_RST, REG_CTRL(%ebx)
    jz 2f
    pause
    loop 1b
    movl $msg_reset, %esi
    jmp fatal
2:  movl $0xffffffff, REG_IMC(%ebx)     # no interrupts
    movl REG_RAH0(%ebx), %eax
    testl $0x80000000, %eax             # address valid
    jz 3f
    movw %ax, smac + 4
    movl REG_RAL0(%ebx), %eax
    movl %eax, smac

    xorl %ecx, %ecx                     # descriptors: buffer address, DD set (free)
4:  movl %ecx, %eax
    shll $11, %eax
    addl $buffers, %eax
    movl %ecx, %edx
    shll $4, %edx
    movl %eax, ring(%edx)
    movl $0, ring + 4(%edx)
    movl $0, ring + 8(%edx)
    movl $1, ring + 12(%edx)
    incl %ecx
    cmpl $RING, %ecx
    jb 4b
    movl $ring, REG_TDBAL(%ebx)
    movl $0, REG_TDBAH(%ebx)
    movl $RING * 16, REG_TDLEN(%ebx)
    movl $0, REG_TDH(%ebx)
    movl $0, REG_TDT(%ebx)
    movl $TIPG_VALUE, REG_TIPG(%ebx)
    movl $TCTL_VALUE, REG_TCTL(%ebx)
    ret
3:  movl $msg_no_mac, %esi
    jmp fatal

# send_packet: builds packet `seq` in the next descriptor's buffer and hands it to the NIC.
send_packet:
    pushl %ebx
    pushl %esi
    pushl %edi
    movl slot, %ebx
    shll $4, %ebx                       # descriptor offset
    movl $MAX_WAIT, %ecx
1:  testl $1, ring + 12(%ebx)           # DD: the NIC is done with it
    jnz 2f
    pause
    loop 1b
    movl $msg_tx_hang, %esi
    jmp fatal
2:  movl ring(%ebx), %edi               # the buffer
    call build_frame                    # out: %eax = frame length
    orl $TX_CMD, %eax
    movl %eax, ring + 8(%ebx)
    movl $0, ring + 12(%ebx)
    movl slot, %eax
    incl %eax
    andl $RING - 1, %eax
    movl %eax, slot
    movl mmio, %edx
    movl %eax, REG_TDT(%edx)
    popl %edi
    popl %esi
    popl %ebx
    ret

# build_frame: the frame of packet `seq` at %edi. Out: %eax = length.
build_frame:
    pushl %ebx
    movl dmac, %eax                     # Ethernet
    movl %eax, 0(%edi)
    movw dmac + 4, %ax
    movw %ax, 4(%edi)
    movl smac, %eax
    movl %eax, 6(%edi)
    movw smac + 4, %ax
    movw %ax, 10(%edi)
    movw $0x0008, 12(%edi)              # 0x0800 big-endian
    movl $0x00000045, 14(%edi)          # version/IHL, TOS, total length (below)
    movl size, %eax
    addl $28, %eax
    xchgb %al, %ah
    movw %ax, 16(%edi)
    movl seq, %eax                      # ID = seq mod 65536
    xchgb %al, %ah
    movw %ax, 18(%edi)
    movw $0x0040, 20(%edi)              # DF
    movw $0x1140, 22(%edi)              # TTL 64, protocol 17
    movw $0, 24(%edi)
    movl src_ip, %eax
    movl %eax, 26(%edi)
    movl dst_ip, %eax
    movl %eax, 30(%edi)
    xorl %eax, %eax                     # IPv4 header checksum
    xorl %ecx, %ecx
3:  movzwl 14(%edi,%ecx,2), %edx
    addl %edx, %eax
    incl %ecx
    cmpl $10, %ecx
    jb 3b
    movl %eax, %edx
    shrl $16, %edx
    andl $0xffff, %eax
    addl %edx, %eax
    movl %eax, %edx
    shrl $16, %edx
    addl %edx, %eax
    notl %eax
    movw %ax, 24(%edi)
    movl sport, %eax                    # UDP
    xchgb %al, %ah
    movw %ax, 34(%edi)
    movl dport, %eax
    xchgb %al, %ah
    movw %ax, 36(%edi)
    movl size, %eax
    addl $8, %eax
    xchgb %al, %ah
    movw %ax, 38(%edi)
    movw $0, 40(%edi)
    movl seq + 4, %eax                  # payload: seq as big-endian u64
    bswapl %eax
    movl %eax, 42(%edi)
    movl seq, %eax
    bswapl %eax
    movl %eax, 46(%edi)
    movl $8, %ecx                       # then byte k = (seq + k) mod 256
    movl seq, %ebx
4:  cmpl size, %ecx
    jae 5f
    leal (%ebx,%ecx), %eax
    movb %al, 42(%edi,%ecx)
    incl %ecx
    jmp 4b
5:  movl size, %eax
    addl $42, %eax
6:  cmpl $60, %eax                      # zero padding to the Ethernet minimum
    jae 7f
    movb $0, (%edi,%eax)
    incl %eax
    jmp 6b
7:  popl %ebx
    ret

# ---------------------------------------------------------------------------------------------------------
# Pacing with PIT channel 0 (mode 2, period 65536 ticks of 1.193182 MHz), polled: no interrupts.

pit_init:
    movb $0x34, %al                     # channel 0, low/high byte, mode 2
    outb %al, $0x43
    xorb %al, %al
    outb %al, $0x40
    outb %al, $0x40
    ret

# pit_elapsed: ticks since pit_init (u32, wrapping), if polled at least every 55 ms. Out: %eax.
pit_elapsed:
    movb $0x00, %al                     # latch channel 0
    outb %al, $0x43
    inb $0x40, %al
    movb %al, %cl
    inb $0x40, %al
    movb %al, %ch
    movzwl %cx, %ecx
    movl pit_last, %eax
    movl %ecx, pit_last
    subl %ecx, %eax                     # counts down
    andl $0xffff, %eax
    addl %eax, pit_ticks
    movl pit_ticks, %eax
    ret

# pace: waits until the next packet is due; never bursts to catch up after a pause.
pace:
    movl interval, %eax
    addl %eax, deadline
1:  call pit_elapsed
    movl %eax, %edx
    subl deadline, %edx
    jns 2f
    movl $1000, %ecx
3:  pause
    loop 3b
    jmp 1b
2:  cmpl interval, %edx
    jbe 4f
    movl %eax, deadline
4:  ret

# ---------------------------------------------------------------------------------------------------------

# print_setup: "qudp: e1000 mac M src S dst D dmac M port P sport P rate R size S".
print_setup:
    movl $msg_setup, %esi
    call puts
    movl $smac, %ebx
    call put_mac
    movl $msg_src, %esi
    call puts
    movl $src_ip, %ebx
    call put_ip
    movl $msg_dst, %esi
    call puts
    movl $dst_ip, %ebx
    call put_ip
    movl $msg_dmac, %esi
    call puts
    movl $dmac, %ebx
    call put_mac
    movl $msg_port, %esi
    call puts
    movl dport, %eax
    call put_dec32
    movl $msg_rate, %esi
    call puts
    movl rate, %eax
    call put_dec32
    movl $msg_size, %esi
    call puts
    movl size, %eax
    call put_dec32
    movb $'\n', %al
    jmp putc

put_mac:                                # six bytes at %ebx
    pushl %edi
    xorl %edi, %edi
1:  movb (%ebx,%edi), %al
    call put_hex8
    incl %edi
    cmpl $6, %edi
    je 2f
    movb $':', %al
    call putc
    jmp 1b
2:  popl %edi
    ret

put_ip:                                 # four bytes at %ebx
    pushl %edi
    xorl %edi, %edi
1:  movzbl (%ebx,%edi), %eax
    call put_dec32
    incl %edi
    cmpl $4, %edi
    je 2f
    movb $'.', %al
    call putc
    jmp 1b
2:  popl %edi
    ret

    .section .rodata
guest_name:     .asciz "qudp"
key_src:        .asciz "src"
key_dst:        .asciz "dst"
key_dmac:       .asciz "dmac"
key_port:       .asciz "port"
key_sport:      .asciz "sport"
key_rate:       .asciz "rate"
key_size:       .asciz "size"
key_print:      .asciz "print"
key_count:      .asciz "count"
msg_seq:        .asciz "seq "
msg_done:       .asciz "qudp: done "
msg_no_e1000:   .asciz "no e1000 (PCI 8086:100e) on bus 0"
msg_bad_bar:    .asciz "the e1000's BAR0 is not an assigned memory BAR"
msg_reset:      .asciz "the e1000 did not come out of reset"
msg_no_mac:     .asciz "the e1000 has no valid MAC in RAL0/RAH0"
msg_tx_hang:    .asciz "the e1000 did not complete a transmit descriptor"
msg_setup:      .asciz "qudp: e1000 mac "
msg_src:        .asciz " src "
msg_dst:        .asciz " dst "
msg_dmac:       .asciz " dmac "
msg_port:       .asciz " port "
msg_rate:       .asciz " rate "
msg_size:       .asciz " size "

    .section .data
dmac:   .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff

    .section .bss
    .balign 128
ring:           .skip RING * 16
    .balign 4096
buffers:        .skip RING * BUF_SIZE
    .balign 8
seq:            .skip 8
smac:           .skip 8
src_ip:         .skip 4
dst_ip:         .skip 4
dport:          .skip 4
sport:          .skip 4
rate:           .skip 4
size:           .skip 4
print_every:    .skip 4
print_countdown: .skip 4
count:          .skip 4
pci_dev:        .skip 4
mmio:           .skip 4
slot:           .skip 4
interval:       .skip 4
deadline:       .skip 4
pit_last:       .skip 4
pit_ticks:      .skip 4
