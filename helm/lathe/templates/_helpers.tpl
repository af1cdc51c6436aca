{{/* Names and labels shared by every template. */}}
{{- define "lathe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lathe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lathe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lathe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end }}

{{/* Labels of every object, without the component (api or trainer). */}}
{{- define "lathe.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "lathe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lathe.labels" -}}
{{ include "lathe.commonLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{- define "lathe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lathe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The trainer pods' ServiceAccount; empty means the namespace default (its token is never mounted). */}}
{{- define "lathe.trainerServiceAccountName" -}}
{{- if .Values.trainer.serviceAccount.create }}
{{- default (printf "%s-trainer" (include "lathe.fullname" .)) .Values.trainer.serviceAccount.name }}
{{- else }}
{{- .Values.trainer.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lathe.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}

{{- define "lathe.modelCache" -}}
{{- $c := .Values.trainer.modelCache }}
{{- if and $c.hostPath $c.pvc }}
{{- fail "trainer.modelCache: set hostPath or pvc, not both" }}
{{- end }}
{{- if $c.hostPath }}
{{- if not (hasPrefix "/" $c.hostPath) }}
{{- fail "trainer.modelCache.hostPath must be an absolute path on the node, e.g. /var/cache/lathe" }}
{{- end }}
{{- $c.hostPath }}
{{- else }}
{{- $c.pvc }}
{{- end }}
{{- end }}
